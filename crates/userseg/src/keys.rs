//! `userseg keys new`: a fresh random token, printed once, and the `[[key]]` block that lets
//! the server accept it (the server stores only the token's SHA-256).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use rand::RngCore;
use userseg_api::auth::{token_sha256_hex, validate_key_name};
use userseg_api::Role;

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new key: prints its token (once) and the [[key]] block for API_KEYS_FILE.
    New {
        /// Name of the key (shown in logs; unique in the file), e.g. the client's name.
        #[arg(long)]
        name: String,
        /// Comma-separated roles: ingest, read, members, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
    },
}

/// A new token: `usk_` and 32 random bytes in hex (256 bits from the OS-seeded CSPRNG).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("usk_{hex}")
}

/// The `[[key]]` block for a token.
pub fn key_block(name: &str, token: &str, roles: &[Role]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[key]]\nname = {}\nsha256 = \"{}\"\nroles = [{}]\n",
        toml::Value::String(name.to_owned()),
        token_sha256_hex(token),
        roles.join(", ")
    )
}

pub fn run(args: KeysArgs) -> Result<()> {
    match args.command {
        KeysCommand::New { name, roles } => {
            if let Err(e) = validate_key_name(&name) {
                bail!("--name: {e}");
            }
            let mut parsed = Vec::new();
            for r in roles.iter().map(|r| r.trim()) {
                let Some(role) = Role::parse(r) else {
                    bail!("--roles: unknown role {r:?}; roles are ingest, read, members, admin");
                };
                if !parsed.contains(&role) {
                    parsed.push(role);
                }
            }
            let token = new_token();
            println!("token: {token}");
            println!();
            print!("{}", key_block(&name, &token, &parsed));
            eprintln!(
                "The token is shown only this once: give it to the client (Authorization: Bearer <token>). \
                 Append the [[key]] block to API_KEYS_FILE and send the server SIGHUP."
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use userseg_api::KeySet;

    #[test]
    fn the_block_parses_and_accepts_the_token() {
        let token = new_token();
        assert_eq!(token.len(), 4 + 64);
        assert_ne!(token, new_token());
        let block = key_block("team \"a\"", &token, &[Role::Ingest, Role::Read]);
        let keys = KeySet::parse(Path::new("k.toml"), &block).unwrap();
        assert_eq!(keys.len(), 1);
        let auth = userseg_api::Authenticator::with_keys(keys);
        let header = format!("Bearer {token}").parse().unwrap();
        assert_eq!(
            auth.authorize(Some(&header), Role::Read).unwrap(),
            "team \"a\""
        );
        assert!(auth.authorize(Some(&header), Role::Members).is_err());
    }
}
