//! The producer shared by the publisher and the dead-letter sink: enqueue a set of records,
//! then wait until the broker acknowledged every one of them, bounded by the ack timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use userseg_usecase::PortError;

use crate::config::{producer_config, KafkaConfig};
use crate::context::LogContext;
use crate::error::{port_error, SetupError};

pub(crate) type Client = FutureProducer<LogContext>;

/// One message to produce.
pub(crate) struct Record {
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Option<OwnedHeaders>,
}

/// What an acknowledged record landed as.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Acked {
    pub partition: i32,
    pub offset: i64,
}

/// A failed delivery: the port error, and the librdkafka code when there is one.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: PortError,
    pub code: Option<RDKafkaErrorCode>,
}

impl Failure {
    fn from_kafka(what: &str, e: &KafkaError) -> Self {
        Failure {
            error: port_error(what, e),
            code: e.rdkafka_error_code(),
        }
    }
}

pub(crate) struct ProducerHandle {
    config: KafkaConfig,
    name: &'static str,
    overrides: &'static [(&'static str, &'static str)],
    /// Replaced when the idempotent producer becomes unusable (see `check_fatal`).
    current: Mutex<Current>,
}

struct Current {
    client: Arc<Client>,
    created: Instant,
}

impl Current {
    fn new(client: Client) -> Self {
        Current {
            client: Arc::new(client),
            created: Instant::now(),
        }
    }
}

/// A producer is replaced at most this often.
const MIN_PRODUCER_AGE: Duration = Duration::from_secs(1);

fn build(
    config: &KafkaConfig,
    name: &'static str,
    overrides: &[(&'static str, &'static str)],
) -> Result<Client, KafkaError> {
    let mut c = producer_config(config);
    for (k, v) in overrides {
        c.set(*k, *v);
    }
    FutureProducer::from_config_and_context(&c, LogContext { client: name })
}

impl ProducerHandle {
    pub fn new(config: &KafkaConfig, name: &'static str) -> Result<Self, SetupError> {
        Self::with_overrides(config, name, &[])
    }

    /// A producer with some librdkafka properties set over [`producer_config`]'s.
    pub fn with_overrides(
        config: &KafkaConfig,
        name: &'static str,
        overrides: &'static [(&'static str, &'static str)],
    ) -> Result<Self, SetupError> {
        let client = build(config, name, overrides).map_err(SetupError::Client)?;
        Ok(ProducerHandle {
            config: config.clone(),
            name,
            overrides,
            current: Mutex::new(Current::new(client)),
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    pub fn get(&self) -> Arc<Client> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .client
            .clone()
    }

    /// After an error: an idempotent producer that raised a fatal error, or whose producer id
    /// the broker fenced or forgot, refuses every later send; it is replaced by a fresh one
    /// (a new producer id). Its unacknowledged messages have failed and were reported.
    pub fn check_fatal(&self, failed: &Arc<Client>, error: &KafkaError) {
        let unusable = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        ) || failed.client().fatal_error().is_some();
        if !unusable {
            return;
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&current.client, failed) {
            return; // replaced already
        }
        if current.created.elapsed() < MIN_PRODUCER_AGE {
            return; // a fresh producer failing again: do not churn producer ids
        }
        match build(&self.config, self.name, self.overrides) {
            Ok(fresh) => {
                tracing::warn!(
                    client = self.name,
                    error = %error,
                    fatal = ?failed.client().fatal_error(),
                    "kafka producer became unusable; replaced it with a new one"
                );
                metrics::counter!("userseg_kafka_producer_replacements_total").increment(1);
                let old = std::mem::replace(&mut *current, Current::new(fresh));
                // Dropping a producer purges and flushes it: not on an async worker.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => tracing::error!(
                client = self.name,
                error = %e,
                "kafka producer became unusable and could not be recreated"
            ),
        }
    }

    /// Enqueues every record, then waits for all acknowledgements. `Ok` only when the broker
    /// acknowledged every record; otherwise the first failure (records enqueued before a failure
    /// may still be delivered: callers retry, and consumers are idempotent).
    pub async fn deliver(
        &self,
        topic: &str,
        records: Vec<Record>,
        what: &str,
    ) -> Result<Vec<Acked>, Failure> {
        let producer = self.get();
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let mut record: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(topic).payload(r.value.as_slice());
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            if let Some(k) = &r.key {
                record = record.key(k.as_str());
            }
            if let Some(h) = &r.headers {
                record = record.headers(h.clone());
            }
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => {
                    self.check_fatal(&producer, &e);
                    return Err(Failure::from_kafka(what, &e));
                }
            }
        }
        drop(records);
        // librdkafka fails every message after message.timeout.ms = ack_timeout; the extra
        // margin only guards against a lost callback, so this never hangs.
        let bound = self.config.ack_timeout + Duration::from_secs(1);
        let wait = async {
            let mut acked = Vec::with_capacity(pending.len());
            for delivery in pending {
                match delivery.await {
                    Ok(Ok(d)) => acked.push(Acked {
                        partition: d.partition,
                        offset: d.offset,
                    }),
                    Ok(Err((e, _))) => {
                        self.check_fatal(&producer, &e);
                        return Err(Failure::from_kafka(what, &e));
                    }
                    Err(_) => {
                        return Err(Failure {
                            error: PortError::Transient(format!(
                                "{what}: the kafka producer was closed"
                            )),
                            code: None,
                        })
                    }
                }
            }
            Ok(acked)
        };
        match tokio::time::timeout(bound, wait).await {
            Ok(result) => result,
            Err(_) => Err(Failure {
                error: PortError::Transient(format!(
                    "{what}: no acknowledgement from kafka within {:?}",
                    self.config.ack_timeout
                )),
                code: Some(RDKafkaErrorCode::MessageTimedOut),
            }),
        }
    }

    /// Waits until every enqueued message was delivered or failed.
    pub async fn flush(&self, timeout: Duration) -> Result<(), PortError> {
        let producer = self.get();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| PortError::Transient(format!("flushing the kafka producer: {e}")))?
            .map_err(|e| port_error("flushing the kafka producer", &e))
    }
}
