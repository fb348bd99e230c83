//! Segment analytics use cases: per-user lookup, user deletion, counts with a lookback, set
//! expressions, overlap and member export. Validation lives here, once for HTTP and gRPC; the
//! computing is the store's ([`SegmentAnalytics`]).

use std::sync::Arc;

use tokio::sync::mpsc;
use userseg_domain::{
    parse_duration, validate_segment, validate_user_id, DeletionError, DurationError, ErrorKind,
    Expr, ExprError, PairError, UnixSeconds, UserDeletion, Window, Within,
};

use crate::{
    Clock, Member, Membership, Overlap, PairPublisher, PortError, SegmentAnalytics, SegmentCount,
};

/// Most segments in one overlap request.
pub const MAX_OVERLAP_SEGMENTS: usize = 64;
/// Members per chunk of an export.
pub const EXPORT_CHUNK: usize = 4096;
/// Chunks buffered between the store and the client of an export (bounds its memory).
pub const EXPORT_BUFFER_CHUNKS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("invalid user_id: {0}")]
    InvalidUser(PairError),
    #[error("invalid segment name: {0}")]
    InvalidSegment(PairError),
    #[error("invalid within: {0}")]
    InvalidWithin(DurationError),
    #[error(transparent)]
    InvalidExpr(#[from] ExprError),
    #[error("invalid segments: {0}")]
    InvalidOverlap(String),
    #[error("invalid deletion: {0}")]
    InvalidDeletion(#[from] DeletionError),
    /// This process serves deletions but not reads, or the reverse (a USS, an ES).
    #[error("this process does not serve {0}")]
    NotServed(&'static str),
    #[error(transparent)]
    Store(#[from] PortError),
}

impl AnalyticsError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AnalyticsError::Store(PortError::Overloaded(_)) => ErrorKind::Overloaded,
            AnalyticsError::Store(PortError::Transient(_)) => ErrorKind::Unavailable,
            AnalyticsError::Store(PortError::Permanent(_)) => ErrorKind::Internal,
            AnalyticsError::InvalidDeletion(DeletionError::TooMany { .. }) => {
                ErrorKind::PayloadTooLarge
            }
            AnalyticsError::NotServed(_) => ErrorKind::NotFound,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

/// `GET /v1/users/{id}/segments`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSegments {
    pub user_id: String,
    pub segments: Vec<Membership>,
    pub as_of: UnixSeconds,
}

/// `GET /v1/segments/{s}?within=` and `GET /v1/count?q=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprCount {
    /// The expression as given.
    pub query: String,
    pub users: u64,
    pub within_seconds: u64,
    pub as_of: UnixSeconds,
}

/// `GET /v1/segments?within=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountList {
    pub segments: Vec<SegmentCount>,
    pub within_seconds: u64,
    pub as_of: UnixSeconds,
}

/// `GET /v1/overlap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlapAnswer {
    pub segments: Vec<String>,
    pub overlap: Overlap,
    pub within_seconds: u64,
    pub as_of: UnixSeconds,
}

/// A running export: chunks of members, and the export's outcome once the channel closes.
pub struct Export {
    pub members: mpsc::Receiver<Vec<Member>>,
    pub done: tokio::task::JoinHandle<Result<u64, PortError>>,
    pub within_seconds: u64,
    pub as_of: UnixSeconds,
}

/// The reads come from `store`, deletions go to `publisher`; a process may have only one of
/// them (distributed mode: deletions on USS, reads on ES).
#[derive(Clone)]
pub struct Analytics {
    store: Option<Arc<dyn SegmentAnalytics>>,
    publisher: Option<Arc<dyn PairPublisher>>,
    clock: Arc<dyn Clock>,
    window: Window,
}

impl Analytics {
    pub fn new(
        store: Arc<dyn SegmentAnalytics>,
        publisher: Arc<dyn PairPublisher>,
        clock: Arc<dyn Clock>,
        window: Window,
    ) -> Self {
        Analytics {
            store: Some(store),
            publisher: Some(publisher),
            clock,
            window,
        }
    }

    /// Reads only (an ES): deletions answer [`AnalyticsError::NotServed`].
    pub fn reads(store: Arc<dyn SegmentAnalytics>, clock: Arc<dyn Clock>, window: Window) -> Self {
        Analytics {
            store: Some(store),
            publisher: None,
            clock,
            window,
        }
    }

    /// Deletions only (a USS): reads answer [`AnalyticsError::NotServed`].
    pub fn deletions(
        publisher: Arc<dyn PairPublisher>,
        clock: Arc<dyn Clock>,
        window: Window,
    ) -> Self {
        Analytics {
            store: None,
            publisher: Some(publisher),
            clock,
            window,
        }
    }

    pub fn serves_reads(&self) -> bool {
        self.store.is_some()
    }

    pub fn serves_deletions(&self) -> bool {
        self.publisher.is_some()
    }

    fn store(&self) -> Result<&Arc<dyn SegmentAnalytics>, AnalyticsError> {
        self.store
            .as_ref()
            .ok_or(AnalyticsError::NotServed("analytics"))
    }

    pub fn window(&self) -> Window {
        self.window
    }

    /// Parses a `within` query text (`7d`) against the window.
    pub fn parse_within(&self, text: Option<&str>) -> Result<Option<Within>, AnalyticsError> {
        text.map(|t| Within::parse(t, self.window))
            .transpose()
            .map_err(AnalyticsError::InvalidWithin)
    }

    /// A `within_seconds` of gRPC: 0 means none.
    pub fn within_from_secs(&self, secs: u64) -> Result<Option<Within>, AnalyticsError> {
        if secs == 0 {
            return Ok(None);
        }
        Within::from_secs(secs, self.window)
            .map(Some)
            .map_err(AnalyticsError::InvalidWithin)
    }

    /// Parses a duration text (e.g. `step=1h`).
    pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
        parse_duration(text)
    }

    fn within_secs(&self, within: Option<Within>) -> u64 {
        within.map_or(self.window.secs(), Within::secs)
    }

    pub async fn user_segments(&self, user_id: &str) -> Result<UserSegments, AnalyticsError> {
        validate_user_id(user_id).map_err(AnalyticsError::InvalidUser)?;
        let at = self.clock.now();
        let segments = self.store()?.user_segments(user_id, at).await?;
        Ok(UserSegments {
            user_id: user_id.to_owned(),
            segments,
            as_of: at,
        })
    }

    /// Validates and durably logs a deletion; returns how many distinct users it names. The
    /// deletion is applied by the batch processor in log order.
    pub async fn delete_users(&self, user_ids: Vec<String>) -> Result<usize, AnalyticsError> {
        let deletion = UserDeletion::new(user_ids)?;
        let n = deletion.len();
        let publisher = self
            .publisher
            .as_ref()
            .ok_or(AnalyticsError::NotServed("user deletions"))?;
        publisher.publish_deletion(deletion).await?;
        metrics::counter!("userseg_users_deleted_total").increment(n as u64);
        Ok(n)
    }

    pub async fn count_segment(
        &self,
        segment: &str,
        within: Option<Within>,
    ) -> Result<ExprCount, AnalyticsError> {
        validate_segment(segment).map_err(AnalyticsError::InvalidSegment)?;
        let at = self.clock.now();
        let users = self.store()?.count_within(segment, at, within).await?;
        Ok(ExprCount {
            query: segment.to_owned(),
            users,
            within_seconds: self.within_secs(within),
            as_of: at,
        })
    }

    pub async fn count_all(&self, within: Option<Within>) -> Result<CountList, AnalyticsError> {
        let at = self.clock.now();
        let segments = self.store()?.count_all_within(at, within).await?;
        Ok(CountList {
            segments,
            within_seconds: self.within_secs(within),
            as_of: at,
        })
    }

    pub async fn count_expr(
        &self,
        query: &str,
        within: Option<Within>,
    ) -> Result<ExprCount, AnalyticsError> {
        let expr = Expr::parse(query)?;
        let at = self.clock.now();
        let users = self.store()?.count_expr(&expr, at, within).await?;
        Ok(ExprCount {
            query: query.to_owned(),
            users,
            within_seconds: self.within_secs(within),
            as_of: at,
        })
    }

    /// `segments`: 2 to 64 distinct valid names, in the order of the answer.
    pub async fn overlap(
        &self,
        segments: Vec<String>,
        within: Option<Within>,
    ) -> Result<OverlapAnswer, AnalyticsError> {
        check_overlap_segments(&segments)?;
        let at = self.clock.now();
        let overlap = self.store()?.overlap(&segments, at, within).await?;
        Ok(OverlapAnswer {
            segments,
            overlap,
            within_seconds: self.within_secs(within),
            as_of: at,
        })
    }

    /// Starts streaming the members of `segment`.
    pub fn export(&self, segment: &str, within: Option<Within>) -> Result<Export, AnalyticsError> {
        validate_segment(segment).map_err(AnalyticsError::InvalidSegment)?;
        let at = self.clock.now();
        let (tx, rx) = mpsc::channel(EXPORT_BUFFER_CHUNKS);
        let store = self.store()?.clone();
        let segment = segment.to_owned();
        let done = tokio::spawn(async move {
            store
                .export_members(&segment, at, within, EXPORT_CHUNK, tx)
                .await
        });
        Ok(Export {
            members: rx,
            done,
            within_seconds: self.within_secs(within),
            as_of: at,
        })
    }
}

/// Splits `a,b,c` into names (no trimming: names hold no spaces).
pub fn split_segments(list: &str) -> Vec<String> {
    if list.is_empty() {
        return Vec::new();
    }
    list.split(',').map(str::to_owned).collect()
}

fn check_overlap_segments(segments: &[String]) -> Result<(), AnalyticsError> {
    let bad = |m: String| Err(AnalyticsError::InvalidOverlap(m));
    if segments.len() < 2 || segments.len() > MAX_OVERLAP_SEGMENTS {
        return bad(format!(
            "{} segments given; give 2 to {MAX_OVERLAP_SEGMENTS} distinct segments",
            segments.len()
        ));
    }
    for (i, s) in segments.iter().enumerate() {
        if let Err(e) = validate_segment(s) {
            return bad(format!("segment {i}: {e}"));
        }
        if segments[..i].contains(s) {
            return bad(format!("segment {i}: {s:?} is given twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_segment_rules() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_overlap_segments(&v(&["a", "b"])).is_ok());
        assert!(check_overlap_segments(&v(&["a"])).is_err());
        assert!(check_overlap_segments(&v(&["a", "a"])).is_err());
        assert!(check_overlap_segments(&v(&["a", "b c"])).is_err());
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(check_overlap_segments(&many).is_err());
        assert!(check_overlap_segments(&many[..64]).is_ok());
        assert_eq!(split_segments("a,b,,c"), v(&["a", "b", "", "c"]));
        assert!(split_segments("").is_empty());
    }
}
