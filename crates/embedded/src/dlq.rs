//! Dead letters in standalone mode: one JSON object per line in a file, fsynced.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use userseg_usecase::{DeadLetter, DeadLetterSink, DeadPayload, PortError};

pub struct FileDeadLetters {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileDeadLetters {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileDeadLetters {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }
}

fn line(letter: &DeadLetter) -> String {
    let payload = match &letter.payload {
        DeadPayload::Raw(bytes) => serde_json::json!({
            "raw": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        }),
        DeadPayload::Pairs(pairs) => serde_json::json!({
            "pairs": pairs.iter().map(|p| serde_json::json!({
                "user_id": p.user_id, "segment": p.segment, "ts": p.ts
            })).collect::<Vec<_>>()
        }),
    };
    serde_json::json!({
        "kind": letter.kind.as_str(),
        "reason": letter.reason,
        "attempts": letter.attempts,
        "payload": payload,
    })
    .to_string()
}

#[async_trait]
impl DeadLetterSink for FileDeadLetters {
    async fn send(&self, letter: DeadLetter) -> Result<(), PortError> {
        let mut text = line(&letter);
        text.push('\n');
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| PortError::Transient(format!("{}: {e}", self.path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| PortError::Transient(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use userseg_domain::Pair;
    use userseg_usecase::DeadLetterKind;

    #[tokio::test]
    async fn appends_one_json_line_per_letter() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileDeadLetters::new(dir.path().join("dlq.ndjson"));
        sink.send(DeadLetter {
            payload: DeadPayload::Raw(vec![0xde, 0xad]),
            reason: "undecodable: x".into(),
            kind: DeadLetterKind::Undecodable,
            attempts: 0,
        })
        .await
        .unwrap();
        sink.send(DeadLetter {
            payload: DeadPayload::Pairs(Arc::from(vec![Pair {
                user_id: "u".into(),
                segment: "s".into(),
                ts: 3,
            }])),
            reason: "nope".into(),
            kind: DeadLetterKind::RejectedByStore,
            attempts: 4,
        })
        .await
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("dlq.ndjson")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["payload"]["raw"], "dead");
        assert_eq!(lines[1]["payload"]["pairs"][0]["user_id"], "u");
        assert_eq!(lines[1]["attempts"], 4);
    }
}
