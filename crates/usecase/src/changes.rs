//! The change feed use case: `GET /v1/changes?segments=a,b&after=CURSOR`. Validates the
//! segment filter and the cursor (before any event is sent, so errors get a proper status),
//! then reads the [`ChangeLog`] in bounded chunks: a client that stops reading stops the
//! reading, so a stalled client never grows server memory.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use userseg_domain::{validate_segment, ErrorKind, PairError};

use crate::{ChangeLog, ChangeReadError, ChangeRecord, PortError};

/// Most segments in one filter.
pub const MAX_FEED_SEGMENTS: usize = 256;
/// Events read from the log per chunk (the memory one client can hold on the server).
pub const FEED_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("invalid segment name in segments: {0}")]
    InvalidSegment(PairError),
    #[error("segments names more than {MAX_FEED_SEGMENTS} segments")]
    TooManySegments,
    #[error("{0}; pass a cursor this feed sent (an event's `cursor`, or the SSE `id`)")]
    Malformed(String),
    #[error("{0}; resume with no `after` (from now) and recompute what was missed")]
    Expired(String),
    #[error(transparent)]
    Log(#[from] PortError),
}

impl ChangesError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChangesError::Expired(_) => ErrorKind::Gone,
            ChangesError::Log(PortError::Overloaded(_)) => ErrorKind::Overloaded,
            ChangesError::Log(PortError::Transient(_)) => ErrorKind::Unavailable,
            ChangesError::Log(PortError::Permanent(_)) => ErrorKind::Internal,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

impl From<ChangeReadError> for ChangesError {
    fn from(e: ChangeReadError) -> Self {
        match e {
            ChangeReadError::Malformed(m) => {
                ChangesError::Malformed(format!("malformed cursor: {m}"))
            }
            ChangeReadError::Expired(m) => ChangesError::Expired(format!(
                "the cursor is older than the change log's retention ({m})"
            )),
            ChangeReadError::Port(p) => ChangesError::Log(p),
        }
    }
}

/// Opens change streams over a [`ChangeLog`].
#[derive(Clone)]
pub struct Changes {
    log: Arc<dyn ChangeLog>,
    /// How long one read waits for new events before the stream sends a heartbeat.
    heartbeat: Duration,
}

/// A client's position in the feed. [`ChangeStream::next`] reads one bounded chunk.
pub struct ChangeStream {
    log: Arc<dyn ChangeLog>,
    filter: Option<BTreeSet<String>>,
    cursor: String,
    heartbeat: Duration,
    first: Option<Vec<ChangeRecord>>,
}

/// Parses `a,b,c` into a set of valid segment names (`None`: every segment).
pub fn parse_segments(list: Option<&str>) -> Result<Option<BTreeSet<String>>, ChangesError> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut set = BTreeSet::new();
    for s in list.split(',') {
        validate_segment(s).map_err(ChangesError::InvalidSegment)?;
        set.insert(s.to_string());
    }
    if set.len() > MAX_FEED_SEGMENTS {
        return Err(ChangesError::TooManySegments);
    }
    Ok(Some(set))
}

impl Changes {
    pub fn new(log: Arc<dyn ChangeLog>, heartbeat: Duration) -> Changes {
        Changes { log, heartbeat }
    }

    /// A stream after `after` (the end of the log when `None`) of the events of `segments`
    /// (every segment when `None`). A malformed or expired cursor fails here.
    pub async fn open(
        &self,
        segments: Option<&str>,
        after: Option<&str>,
    ) -> Result<ChangeStream, ChangesError> {
        let filter = parse_segments(segments)?;
        let cursor = match after {
            Some(c) => c.to_string(),
            None => self.log.end().await?,
        };
        let mut stream = ChangeStream {
            log: self.log.clone(),
            filter,
            cursor,
            heartbeat: self.heartbeat,
            first: None,
        };
        // Validates the cursor now, so that its error gets a status of its own.
        let first = stream.read(Duration::ZERO).await?;
        stream.first = Some(first);
        Ok(stream)
    }
}

impl ChangeStream {
    /// The cursor after everything returned so far (and after events filtered out).
    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    /// The next chunk of at most [`FEED_CHUNK`] events of the filter; empty after a heartbeat
    /// interval without any.
    pub async fn next(&mut self) -> Result<Vec<ChangeRecord>, ChangesError> {
        if let Some(first) = self.first.take() {
            if !first.is_empty() {
                return Ok(first);
            }
        }
        let deadline = tokio::time::Instant::now() + self.heartbeat;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = self.read(left).await?;
            if !got.is_empty() || left.is_zero() {
                return Ok(got);
            }
        }
    }

    async fn read(&mut self, wait: Duration) -> Result<Vec<ChangeRecord>, ChangesError> {
        let batch = self.log.read(&self.cursor, FEED_CHUNK, wait).await?;
        self.cursor = batch.next;
        let mut records = batch.records;
        if let Some(f) = &self.filter {
            records.retain(|r| f.contains(&r.event.segment));
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_filters_are_validated() {
        assert_eq!(parse_segments(None).unwrap(), None);
        assert_eq!(parse_segments(Some("")).unwrap(), None);
        let s = parse_segments(Some("a,b,a")).unwrap().unwrap();
        assert_eq!(s.into_iter().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(matches!(
            parse_segments(Some("a,,b")),
            Err(ChangesError::InvalidSegment(_))
        ));
        assert!(matches!(
            parse_segments(Some("no space")),
            Err(ChangesError::InvalidSegment(_))
        ));
        let many: Vec<String> = (0..=MAX_FEED_SEGMENTS).map(|i| format!("s{i}")).collect();
        assert!(matches!(
            parse_segments(Some(&many.join(","))),
            Err(ChangesError::TooManySegments)
        ));
        assert_eq!(ChangesError::Expired("x".into()).kind(), ErrorKind::Gone);
        assert_eq!(
            ChangesError::Malformed("x".into()).kind(),
            ErrorKind::InvalidArgument
        );
    }
}
