//! The AFL++ harness: `userseg-fuzz TARGET` fuzzes one target (stdin / AFL's shared memory),
//! `userseg-fuzz TARGET --seeds DIR` writes its seeds, `userseg-fuzz --list` names the targets.
//! Built and run by `make fuzz` (scripts/fuzz.sh) with `cargo afl`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--list") {
        for t in userseg_fuzz::TARGETS {
            println!("{}\t{}", t.name, t.what);
        }
        return;
    }
    let Some(target) = args.get(1).and_then(|n| userseg_fuzz::target(n)) else {
        eprintln!("usage: userseg-fuzz TARGET [--seeds DIR] | --list");
        std::process::exit(2);
    };
    if args.get(2).map(String::as_str) == Some("--seeds") {
        let Some(dir) = args.get(3) else {
            eprintln!("usage: userseg-fuzz TARGET --seeds DIR");
            std::process::exit(2);
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("{dir}: {e}");
            std::process::exit(1);
        }
        for (i, seed) in (target.seeds)().iter().enumerate() {
            if let Err(e) = std::fs::write(format!("{dir}/seed-{i}"), seed) {
                eprintln!("{dir}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let run = target.run;
    afl::fuzz!(|data: &[u8]| run(data));
}
