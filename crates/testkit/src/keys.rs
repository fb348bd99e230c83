//! API keys for tests of the real binary: an `API_KEYS_FILE` and requests that carry a token.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A key of the file: its name, its roles, its bearer token.
pub struct Key<'a> {
    pub name: &'a str,
    pub roles: &'a [&'a str],
    pub token: &'a str,
}

/// The `sha256` the keys file holds for `token` (lowercase hex).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The TOML of a keys file holding `keys`.
pub fn keys_toml(keys: &[Key<'_>]) -> String {
    keys.iter()
        .map(|k| {
            let roles: Vec<String> = k.roles.iter().map(|r| format!("\"{r}\"")).collect();
            format!(
                "[[key]]\nname = \"{}\"\nsha256 = \"{}\"\nroles = [{}]\n\n",
                k.name,
                sha256_hex(k.token),
                roles.join(", ")
            )
        })
        .collect()
}

/// Writes `dir/keys.toml` holding `keys`; returns its path (for `API_KEYS_FILE`).
pub fn write_keys_file(dir: &Path, keys: &[Key<'_>]) -> PathBuf {
    let path = dir.join("keys.toml");
    std::fs::write(&path, keys_toml(keys)).expect("writing the keys file");
    path
}

/// `GET url` with `token` and `accept`: the status, and the JSON body unless it is 200 (a
/// streaming answer is not read).
pub async fn get_status(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    accept: &str,
) -> (u16, Value) {
    let r = client
        .get(url)
        .bearer_auth(token)
        .header("accept", accept)
        .send()
        .await
        .expect("the request");
    let status = r.status().as_u16();
    if status == 200 {
        return (status, Value::Null);
    }
    let body = r.json().await.expect("a JSON error body");
    (status, body)
}
