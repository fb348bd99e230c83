//! The web console in a real headless browser (Debian's `chromium`, installed by
//! scripts/install-deps.sh): a standalone server with known data, the page rendered by the
//! browser, the segment names and counts it shows compared with the API. Also takes a
//! screenshot, into Cargo's target/tmp/console.png; with `USERSEG_UPDATE_SCREENSHOT=1` it also
//! replaces the one the README shows (docs/console.png, tracked). Fails, never skips, without
//! chromium.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, now, until, Proc};
use serde_json::{json, Value};

/// The browser: `CHROMIUM` if set, else `chromium` on the PATH.
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_string())
}

/// Runs headless chromium on `url` with `args`; returns its stdout. Panics when chromium is
/// missing or fails.
fn run_chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("a chromium profile dir");
    let out = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            // Let the page's requests and timers run (virtual time stops while loads are
            // pending, so the budget is not eaten by a slow server).
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {:?} ({e}): the console tests need a real browser; install it with \
                 scripts/install-deps.sh (Debian's chromium package) or set CHROMIUM",
                chromium()
            )
        });
    assert!(
        out.status.success(),
        "chromium failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM after the page rendered: dumps until `<body data-state=...>` says `want` and
/// `data-loaded` says the view asked for in the address has been loaded.
fn rendered(url: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let dom = run_chromium(url, &["--dump-dom"]);
        let body = dom.split("<body").nth(1).unwrap_or_default();
        let state = attr(body, "data-state");
        if state.as_deref() == Some(want) && attr(body, "data-loaded").as_deref() == Some("1") {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "the page never reached data-state={want:?} (last: {state:?}):\n{dom}"
        );
    }
}

/// The value of attribute `name` in the first tag of `html`.
fn attr(html: &str, name: &str) -> Option<String> {
    let tag = &html[..html.find('>')?];
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The rows of the segments table, in page order: (data-segment, data-users, shown count).
fn segment_rows(dom: &str) -> Vec<(String, u64, String)> {
    let table = dom
        .split("<table id=\"segments\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the segments table is on the page");
    table
        .split("<tr ")
        .skip(1)
        .filter_map(|row| {
            let segment = attr(row, "data-segment")?;
            let users = attr(row, "data-users")?.parse().ok()?;
            let shown = row
                .split("class=\"num users\">")
                .nth(1)?
                .split('<')
                .next()?
                .to_string();
            Some((segment, users, unescape(&shown)))
        })
        .collect()
}

fn spawn(data: &Path, extra: &[(&str, &str)]) -> Proc {
    let port = free_port();
    let log = data.with_extension("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_userseg"));
    cmd.arg("standalone")
        .env("DATA_DIR", data)
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("FLUSH_INTERVAL", "20ms")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().expect("spawn userseg standalone"),
        base: format!("http://127.0.0.1:{port}"),
        port,
        log,
    }
}

/// Known data: segment i of `SEGMENTS` holds `users` distinct users.
const SEGMENTS: &[(&str, u64)] = &[
    ("sports", 1200),
    ("news", 860),
    ("music", 640),
    ("travel.europe", 410),
    ("cars:electric", 275),
    ("games", 190),
    ("fashion", 120),
    ("cooking", 75),
    ("finance_pro", 40),
    ("gardening", 12),
    ("chess-club", 3),
];

async fn load_known_data(base: &str, token: Option<&str>) {
    let client = reqwest::Client::new();
    let ts = now() - 120;
    for (segment, users) in SEGMENTS {
        let pairs: Vec<Value> = (0..*users)
            .map(|u| json!({"user_id": format!("user-{u}"), "segment": segment, "ts": ts}))
            .collect();
        let mut req = client
            .post(format!("{base}/v1/pairs"))
            .json(&json!({ "pairs": pairs }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("push");
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
}

async fn api_segments(base: &str, token: Option<&str>) -> Vec<(String, u64)> {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/segments"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let body: Value = req.send().await.expect("list").json().await.expect("json");
    body["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .map(|s| {
            (
                s["segment"].as_str().unwrap_or_default().to_string(),
                s["users"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_segments_and_counts_the_api_gives() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(&dir.path().join("data"), &[]);
    p.ready().await;
    load_known_data(&p.base, None).await;
    let want: Vec<(String, u64)> = SEGMENTS.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    until("every pushed pair is counted", 30, async || {
        let mut got = api_segments(&p.base, None).await;
        got.sort_by_key(|s| std::cmp::Reverse(s.1));
        got == want
    })
    .await;

    // The assets are served from the binary.
    let page = reqwest::get(format!("{}/ui/", p.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let js = reqwest::get(format!("{}/ui/app.js", p.base)).await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let missing = reqwest::get(format!("{}/ui/nope.js", p.base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let url = format!("{}/ui/", p.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url, "ready"))
        .await
        .unwrap();
    let rows = segment_rows(&dom);
    let api = api_segments(&p.base, None).await;
    // Same segments and counts as the API, sorted by users, largest first (the default).
    let mut expected = api.clone();
    expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<(String, u64)> = rows.iter().map(|(s, n, _)| (s.clone(), *n)).collect();
    assert_eq!(
        shown, expected,
        "the page's rows differ from GET /v1/segments"
    );
    // The visible text is the count, formatted.
    for (segment, users, text) in &rows {
        assert_eq!(
            text.replace(',', "").parse::<u64>().ok(),
            Some(*users),
            "{segment}: shows {text:?}"
        );
    }
    assert!(dom.contains("(11)"), "the segment total is shown");

    // A screenshot, into the target dir: the tracked one the README shows is replaced only
    // when asked for (USERSEG_UPDATE_SCREENSHOT=1), not by every test run.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("{}/ui/", p.base);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || run_chromium(&url, &[&arg, "--window-size=1280,800"]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "{} is a PNG", shot.display());
    assert!(png.len() > 10_000, "the screenshot is suspiciously small");
    if std::env::var("USERSEG_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        let readme = repo_file("docs/console.png");
        std::fs::write(&readme, &png).expect("write docs/console.png");
        println!("console: wrote {}", readme.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_asks_for_a_token_when_the_api_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = "console-test-token";
    let mut p = spawn(&dir.path().join("data"), &[("API_TOKEN", token)]);
    p.ready().await;
    load_known_data(&p.base, Some(token)).await;
    until("every pushed pair is counted", 30, async || {
        api_segments(&p.base, Some(token)).await.len() == SEGMENTS.len()
    })
    .await;

    // The page itself needs no token; the API answers it 401 and the page asks for one.
    let url = format!("{}/ui/", p.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url, "needs-token"))
        .await
        .unwrap();
    let panel = dom
        .split("<section id=\"token-panel\"")
        .nth(1)
        .expect("the token panel");
    assert!(
        !panel[..panel.find('>').unwrap()].contains("hidden"),
        "the token panel is shown"
    );
    assert!(segment_rows(&dom).is_empty(), "no data without a token");

    // With the token (handed over in the fragment, moved to sessionStorage), it renders.
    let url = format!("{}/ui/#token={token}", p.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url, "ready"))
        .await
        .unwrap();
    let mut shown: Vec<(String, u64)> = segment_rows(&dom)
        .into_iter()
        .map(|(s, n, _)| (s, n))
        .collect();
    shown.sort();
    let mut api = api_segments(&p.base, Some(token)).await;
    api.sort();
    assert_eq!(shown, api);
    assert!(
        !dom.contains(token),
        "the token is not left in the page or its address"
    );
}

/// The text inside the element with `id`, tags stripped.
fn text_of(dom: &str, id: &str) -> String {
    let Some(start) = dom.find(&format!("id=\"{id}\"")) else {
        return String::new();
    };
    let rest = &dom[start..];
    let rest = &rest[rest.find('>').map_or(0, |i| i + 1)..];
    let mut out = String::new();
    let mut depth = 0;
    let mut in_tag = false;
    for (i, c) in rest.char_indices() {
        if c == '<' {
            in_tag = true;
            if rest[i..].starts_with("</") {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            } else if !["<input", "<br", "<img", "<hr"]
                .iter()
                .any(|t| rest[i..].starts_with(t))
            {
                depth += 1;
            }
        } else if c == '>' {
            in_tag = false;
        } else if !in_tag {
            out.push(c);
        }
    }
    unescape(&out)
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}{path}")).await.expect("get");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_filters_sorts_and_shows_the_analytics_panels() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(&dir.path().join("data"), &[]);
    p.ready().await;
    load_known_data(&p.base, None).await;
    until("every pushed pair is counted", 30, async || {
        api_segments(&p.base, None).await.len() == SEGMENTS.len()
    })
    .await;

    // Filter box and sorting by name, set from the address.
    let url = format!("{}/ui/#filter=S&sort=segment", p.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url, "ready"))
        .await
        .unwrap();
    let shown: Vec<String> = segment_rows(&dom).into_iter().map(|r| r.0).collect();
    let mut want: Vec<String> = SEGMENTS
        .iter()
        .map(|(s, _)| s.to_string())
        .filter(|s| s.contains('s'))
        .collect();
    want.sort();
    assert_eq!(shown, want, "filtered on \"S\" (any case), sorted by name");
    assert!(dom.contains(&format!("({} of {})", want.len(), SEGMENTS.len())));

    // Trend, overlap, user lookup and within: the API's answers, or a clear message where this
    // server does not have the endpoint.
    let url = format!(
        "{}/ui/#segment=news&compare=sports,news,music&user=user-5&within=7d",
        p.base
    );
    let dom = tokio::task::spawn_blocking(move || rendered(&url, "ready"))
        .await
        .unwrap();
    assert_eq!(text_of(&dom, "trend-segment"), "news");
    let to = now();
    let history = format!(
        "/v1/segments/news/history?from={}&to={to}&step=2520s",
        to - 604_800
    );
    let (status, _) = get(&p.base, &history).await;
    let trend = text_of(&dom, "trend-panel");
    match status {
        404 => assert!(
            trend.contains("The history API is not available on this server (404"),
            "{trend}"
        ),
        200 => assert!(
            dom.contains("aria-label=\"users over time\"") || trend.contains("No samples"),
            "{trend}"
        ),
        other => panic!("history answered {other}"),
    }

    let (status, overlap) = get(&p.base, "/v1/overlap?segments=sports,news,music").await;
    let panel = text_of(&dom, "overlap-panel");
    match status {
        404 => assert!(
            panel.contains("The overlap API is not available on this server (404"),
            "{panel}"
        ),
        200 => {
            let cells: Vec<u64> = dom
                .split("data-both=\"")
                .skip(1)
                .filter_map(|c| c.split('"').next()?.parse().ok())
                .collect();
            let want: Vec<u64> = overlap["both"]
                .as_array()
                .expect("both")
                .iter()
                .flat_map(|row| row.as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_u64())
                .collect();
            assert_eq!(want.len(), 9);
            assert_eq!(cells, want, "the overlap matrix is the API's");
        }
        other => panic!("overlap answered {other}"),
    }

    let (status, user) = get(&p.base, "/v1/users/user-5/segments").await;
    let panel = text_of(&dom, "user-panel");
    match status {
        404 => assert!(
            panel.contains("The user lookup API is not available on this server (404"),
            "{panel}"
        ),
        200 => {
            let want: Vec<String> = user["segments"]
                .as_array()
                .expect("segments")
                .iter()
                .filter_map(|m| Some(m["segment"].as_str()?.to_string()))
                .collect();
            let table = dom.split("id=\"user-segments\"").nth(1).unwrap_or_default();
            let table = table.split("</table>").next().unwrap_or_default();
            let shown: Vec<String> = table
                .split("<tr ")
                .skip(1)
                .filter_map(|r| attr(r, "data-segment"))
                .collect();
            assert!(!want.is_empty());
            assert_eq!(shown, want, "the user's segments are the API's");
        }
        other => panic!("user lookup answered {other}"),
    }

    let (status, within) = get(&p.base, "/v1/segments?within=7d").await;
    let mut rows: Vec<(String, u64)> = segment_rows(&dom).into_iter().map(|r| (r.0, r.1)).collect();
    rows.sort();
    match status {
        400 => {
            // No sub-windows on this server: the page says so and shows the whole window.
            let message = text_of(&dom, "segments-message");
            assert!(message.starts_with("Within=7d failed: "), "{message}");
            let mut all = api_segments(&p.base, None).await;
            all.sort();
            assert_eq!(rows, all);
        }
        200 => {
            let mut want: Vec<(String, u64)> = within["segments"]
                .as_array()
                .expect("segments")
                .iter()
                .map(|s| {
                    (
                        s["segment"].as_str().unwrap_or_default().to_string(),
                        s["users"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            want.sort();
            assert_eq!(rows, want, "the within=7d counts are the API's");
        }
        other => panic!("within answered {other}"),
    }
}
