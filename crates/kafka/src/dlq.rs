//! [`KafkaDeadLetters`]: the dead-letter topic.

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use userseg_usecase::{DeadLetter, DeadLetterSink, DeadPayload, PortError};

use crate::codec::{encode_chunks, encode_deletion_chunks, into_log_pair, Encoded};
use crate::config::KafkaConfig;
use crate::error::{kind_label, SetupError};
use crate::producer::{ProducerHandle, Record};
use crate::source::{Origin, Provenance};

/// `undecodable`, `invalid_pair` or `rejected_by_store`.
pub const HEADER_KIND: &str = "userseg-kind";
/// Why the message was dead-lettered (UTF-8, at most 2 KiB).
pub const HEADER_REASON: &str = "userseg-reason";
/// How many times the store was tried (decimal; 0 for undecodable or invalid messages).
pub const HEADER_ATTEMPTS: &str = "userseg-attempts";
/// The topic, partition and offset of the original message, when known (raw payloads).
pub const HEADER_SOURCE_TOPIC: &str = "userseg-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "userseg-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "userseg-source-offset";
/// For rejected pairs: how many pairs this message holds (decimal).
pub const HEADER_PAIRS: &str = "userseg-pairs";
/// For a rejected deletion: how many user ids this message holds (decimal).
pub const HEADER_USERS: &str = "userseg-users";
/// For rejected pairs or a rejected deletion split over several messages: `i/n`, 1-based.
pub const HEADER_PART: &str = "userseg-part";

const MAX_REASON_BYTES: usize = 2048;

/// Writes dead letters to KAFKA_DLQ_TOPIC; `send` resolves `Ok` only after the broker
/// acknowledged them. The value is the payload as read from the pair topic (raw), or, for pairs
/// or a deletion the store rejected, encoded records of the pair log (version 1 or 2, split
/// like the publisher splits), which can be produced back to the pair log as they are; the
/// headers say why.
#[derive(Clone)]
pub struct KafkaDeadLetters {
    producer: std::sync::Arc<ProducerHandle>,
    provenance: Option<Provenance>,
}

impl KafkaDeadLetters {
    /// Creates the producer.
    pub fn new(config: &KafkaConfig) -> Result<Self, SetupError> {
        Ok(KafkaDeadLetters {
            producer: std::sync::Arc::new(ProducerHandle::new(config, "dead-letters")?),
            provenance: None,
        })
    }

    /// Adds the source topic, partition and offset of raw payloads that `provenance` (from
    /// [`crate::KafkaSource::provenance`]) knows.
    pub fn with_provenance(mut self, provenance: Provenance) -> Self {
        self.provenance = Some(provenance);
        self
    }

    /// The dead-letter topic (KAFKA_DLQ_TOPIC).
    pub fn dlq_topic(&self) -> &str {
        &self.producer.config().dlq_topic
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn headers(letter: &DeadLetter, origin: Option<&Origin>) -> OwnedHeaders {
    let attempts = letter.attempts.to_string();
    let mut h = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_KIND,
            value: Some(letter.kind.as_str()),
        })
        .insert(Header {
            key: HEADER_REASON,
            value: Some(truncate(&letter.reason, MAX_REASON_BYTES)),
        })
        .insert(Header {
            key: HEADER_ATTEMPTS,
            value: Some(&attempts),
        });
    if let Some(o) = origin {
        let (partition, offset) = (o.partition.to_string(), o.offset.to_string());
        h = h
            .insert(Header {
                key: HEADER_SOURCE_TOPIC,
                value: Some(&o.topic),
            })
            .insert(Header {
                key: HEADER_SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: HEADER_SOURCE_OFFSET,
                value: Some(&offset),
            });
    }
    h
}

/// The records of an encoded payload: each with its count under `count_header`, and its part
/// when there are several.
fn chunked(letter: &DeadLetter, chunks: Vec<Encoded>, count_header: &str) -> Vec<Record> {
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let (count, part) = (chunk.pairs.to_string(), format!("{}/{n}", i + 1));
            let mut h = headers(letter, None).insert(Header {
                key: count_header,
                value: Some(&count),
            });
            if n > 1 {
                h = h.insert(Header {
                    key: HEADER_PART,
                    value: Some(&part),
                });
            }
            Record {
                partition: None,
                key: Some(chunk.key),
                value: chunk.value,
                headers: Some(h),
            }
        })
        .collect()
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letter: DeadLetter) -> Result<(), PortError> {
        let records = match &letter.payload {
            DeadPayload::Raw(bytes) => {
                let origin = self.provenance.as_ref().and_then(|p| p.take(bytes));
                vec![Record {
                    partition: None,
                    key: None,
                    value: bytes.clone(),
                    headers: Some(headers(&letter, origin.as_ref())),
                }]
            }
            DeadPayload::Deletion(d) => {
                let max = self.producer.config().max_message_bytes;
                chunked(
                    &letter,
                    encode_deletion_chunks(d.user_ids().to_vec(), max),
                    HEADER_USERS,
                )
            }
            DeadPayload::Pairs(pairs) => {
                let log = pairs.iter().cloned().map(into_log_pair).collect();
                let max = self.producer.config().max_message_bytes;
                chunked(&letter, encode_chunks(log, max), HEADER_PAIRS)
            }
        };
        let messages = records.len();
        match self
            .producer
            .deliver(self.dlq_topic(), records, "writing a dead letter to kafka")
            .await
        {
            Ok(acked) => {
                metrics::counter!("userseg_kafka_dead_letters_total", "kind" => letter.kind.as_str())
                    .increment(messages as u64);
                if let Some(first) = acked.first() {
                    tracing::info!(
                        topic = %self.dlq_topic(),
                        kind = letter.kind.as_str(),
                        attempts = letter.attempts,
                        partition = first.partition,
                        offset = first.offset,
                        messages,
                        "wrote a dead letter"
                    );
                }
                Ok(())
            }
            Err(failure) => {
                metrics::counter!(
                    "userseg_kafka_dead_letter_failures_total",
                    "kind" => kind_label(&failure.error)
                )
                .increment(1);
                Err(failure.error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_truncated_on_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate(&"x".repeat(5000), MAX_REASON_BYTES).len(), 2048);
    }
}
