//! Set expressions over segments, as `GET /v1/count?q=` takes them.
//!
//! Grammar (keywords in any letter case; NOT binds tightest, then AND, then OR):
//!
//! ```text
//! expr    := and ( OR and )*
//! and     := unary ( AND unary )*
//! unary   := NOT unary | primary
//! primary := "(" expr ")" | NAME | "\"" NAME "\""
//! ```
//!
//! `NAME` is a segment name (`[A-Za-z0-9_.:-]{1,128}`); a segment named like a keyword is
//! written in double quotes. Meaning, for one point in time and one `within`: a segment is the
//! set of its live members; `AND` / `OR` are intersection / union; `NOT x` is the users with at
//! least one live membership (the *universe*) who are not in `x`. Every user the expression
//! selects is therefore in the universe, and [`Expr::matches`] (the per-user truth of the
//! expression) decides membership for a user of the universe.

use std::fmt;

use crate::{validate_segment, PairError, MAX_SEGMENT_CHARS};

/// Most segment references (occurrences, not distinct names) in one expression.
pub const MAX_EXPR_SEGMENTS: usize = 64;
/// Deepest nesting of parentheses and NOTs.
pub const MAX_EXPR_DEPTH: usize = 64;
/// Longest expression text, in bytes.
pub const MAX_EXPR_BYTES: usize = 16 * 1024;

/// A parsed expression. `And` / `Or` hold at least two operands and never an operand of their
/// own kind (chains are flattened: both operators are associative).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    Segment(String),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// What is wrong with an expression, and where (0-based character position in the text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid expression at position {at}: {reason}")]
pub struct ExprError {
    pub at: usize,
    pub reason: ExprErrorReason,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExprErrorReason {
    #[error("the expression is empty")]
    Empty,
    #[error("the expression is {len} bytes long; at most {MAX_EXPR_BYTES} are allowed")]
    TooLong { len: usize },
    #[error("expected a segment name, NOT or '(' but found {found}")]
    ExpectedOperand { found: String },
    #[error("expected AND, OR or ')' but found {found}")]
    ExpectedOperator { found: String },
    #[error("expected ')' to close the '(' at position {open} but found {found}")]
    Unclosed { open: usize, found: String },
    #[error("unexpected character {0:?}")]
    BadChar(char),
    #[error("unterminated quoted segment name")]
    UnterminatedQuote,
    #[error("invalid segment name: {0}")]
    BadSegment(PairError),
    #[error("more than {MAX_EXPR_SEGMENTS} segment references")]
    TooManySegments,
    #[error("nested more than {MAX_EXPR_DEPTH} levels deep")]
    TooDeep,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    Name(String),
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Not => "NOT".into(),
            Tok::Name(n) => format!("segment {n:?}"),
            Tok::End => "the end of the expression".into(),
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// Splits the text into tokens with their character positions.
fn tokenize(text: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let tok = match c {
            '(' => {
                i += 1;
                Tok::LParen
            }
            ')' => {
                i += 1;
                Tok::RParen
            }
            '"' => {
                i += 1;
                let from = i;
                while i < chars.len() && chars[i] != '"' {
                    i += 1;
                }
                if i == chars.len() {
                    return Err(ExprError {
                        at: start,
                        reason: ExprErrorReason::UnterminatedQuote,
                    });
                }
                let name: String = chars[from..i].iter().collect();
                i += 1;
                validate_segment(&name).map_err(|e| ExprError {
                    at: match e {
                        PairError::SegmentBadChar { at, .. } => from + at,
                        _ => start,
                    },
                    reason: ExprErrorReason::BadSegment(e),
                })?;
                Tok::Name(name)
            }
            c if is_name_char(c) => {
                while i < chars.len() && is_name_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if word.eq_ignore_ascii_case("and") {
                    Tok::And
                } else if word.eq_ignore_ascii_case("or") {
                    Tok::Or
                } else if word.eq_ignore_ascii_case("not") {
                    Tok::Not
                } else {
                    if word.len() > MAX_SEGMENT_CHARS {
                        return Err(ExprError {
                            at: start,
                            reason: ExprErrorReason::BadSegment(PairError::SegmentTooLong {
                                len: word.len(),
                            }),
                        });
                    }
                    Tok::Name(word)
                }
            }
            other => {
                return Err(ExprError {
                    at: start,
                    reason: ExprErrorReason::BadChar(other),
                })
            }
        };
        out.push((start, tok));
    }
    out.push((chars.len(), Tok::End));
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    segments: usize,
}

impl Parser {
    fn peek(&self) -> &(usize, Tok) {
        // The token list always ends with `End`, which is never consumed.
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> (usize, Tok) {
        let t = self.peek().clone();
        if t.1 != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let mut items = vec![self.and(depth)?];
        while self.peek().1 == Tok::Or {
            self.bump();
            items.push(self.and(depth)?);
        }
        Ok(join(items, Expr::Or))
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let mut items = vec![self.unary(depth)?];
        while self.peek().1 == Tok::And {
            self.bump();
            items.push(self.unary(depth)?);
        }
        Ok(join(items, Expr::And))
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let (at, tok) = self.bump();
        if depth >= MAX_EXPR_DEPTH && matches!(tok, Tok::Not | Tok::LParen) {
            return Err(ExprError {
                at,
                reason: ExprErrorReason::TooDeep,
            });
        }
        match tok {
            Tok::Not => Ok(Expr::Not(Box::new(self.unary(depth + 1)?))),
            Tok::LParen => {
                let inner = self.or(depth + 1)?;
                let (close_at, close) = self.bump();
                if close != Tok::RParen {
                    return Err(ExprError {
                        at: close_at,
                        reason: ExprErrorReason::Unclosed {
                            open: at,
                            found: close.describe(),
                        },
                    });
                }
                Ok(inner)
            }
            Tok::Name(name) => {
                self.segments += 1;
                if self.segments > MAX_EXPR_SEGMENTS {
                    return Err(ExprError {
                        at,
                        reason: ExprErrorReason::TooManySegments,
                    });
                }
                validate_segment(&name).map_err(|e| ExprError {
                    at,
                    reason: ExprErrorReason::BadSegment(e),
                })?;
                Ok(Expr::Segment(name))
            }
            other => Err(ExprError {
                at,
                reason: ExprErrorReason::ExpectedOperand {
                    found: other.describe(),
                },
            }),
        }
    }
}

/// One operand stays itself; several become `make(...)`, flattening operands of the same kind.
fn join(items: Vec<Expr>, make: fn(Vec<Expr>) -> Expr) -> Expr {
    if items.len() == 1 {
        return items.into_iter().next().unwrap_or(Expr::And(Vec::new()));
    }
    let mut flat = Vec::with_capacity(items.len());
    for e in items {
        match (make(Vec::new()), e) {
            (Expr::And(_), Expr::And(inner)) | (Expr::Or(_), Expr::Or(inner)) => flat.extend(inner),
            (_, e) => flat.push(e),
        }
    }
    make(flat)
}

impl Expr {
    /// Parses an expression (see the module documentation for the grammar).
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        if text.len() > MAX_EXPR_BYTES {
            return Err(ExprError {
                at: 0,
                reason: ExprErrorReason::TooLong { len: text.len() },
            });
        }
        let toks = tokenize(text)?;
        if toks.len() == 1 {
            return Err(ExprError {
                at: 0,
                reason: ExprErrorReason::Empty,
            });
        }
        let mut p = Parser {
            toks,
            pos: 0,
            segments: 0,
        };
        let e = p.or(0)?;
        let (at, tok) = p.bump();
        if tok != Tok::End {
            return Err(ExprError {
                at,
                reason: ExprErrorReason::ExpectedOperator {
                    found: tok.describe(),
                },
            });
        }
        Ok(e)
    }

    /// The distinct segment names referenced, in order of first appearance.
    pub fn segments(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        self.visit(&mut |s| {
            if !out.contains(&s) {
                out.push(s);
            }
        });
        out
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Expr::Segment(s) => f(s),
            Expr::Not(e) => e.visit(f),
            Expr::And(v) | Expr::Or(v) => v.iter().for_each(|e| e.visit(f)),
        }
    }

    /// Whether a user of the universe is selected, given whether it is in each segment.
    pub fn matches(&self, is_member: &impl Fn(&str) -> bool) -> bool {
        match self {
            Expr::Segment(s) => is_member(s),
            Expr::Not(e) => !e.matches(is_member),
            Expr::And(v) => v.iter().all(|e| e.matches(is_member)),
            Expr::Or(v) => v.iter().any(|e| e.matches(is_member)),
        }
    }
}

fn is_keyword(s: &str) -> bool {
    ["and", "or", "not"]
        .iter()
        .any(|k| s.eq_ignore_ascii_case(k))
}

/// The canonical text: fully parenthesized operands, keywords in upper case, keyword-like names
/// quoted. `Expr::parse(&e.to_string()) == Ok(e)`.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn operand(e: &Expr, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match e {
                Expr::And(_) | Expr::Or(_) => write!(f, "({e})"),
                _ => write!(f, "{e}"),
            }
        }
        match self {
            Expr::Segment(s) if is_keyword(s) => write!(f, "\"{s}\""),
            Expr::Segment(s) => f.write_str(s),
            Expr::Not(e) => {
                f.write_str("NOT ")?;
                operand(e, f)
            }
            Expr::And(v) | Expr::Or(v) => {
                let op = if matches!(self, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                for (i, e) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    operand(e, f)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(s: &str) -> Expr {
        Expr::Segment(s.into())
    }
    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    #[test]
    fn precedence_not_then_and_then_or() {
        assert_eq!(
            Expr::parse("a OR b AND NOT c").unwrap(),
            Expr::Or(vec![seg("a"), Expr::And(vec![seg("b"), not(seg("c"))])])
        );
        assert_eq!(
            Expr::parse("NOT a AND b").unwrap(),
            Expr::And(vec![not(seg("a")), seg("b")])
        );
        assert_eq!(
            Expr::parse("(a or b) and not (c or d)").unwrap(),
            Expr::And(vec![
                Expr::Or(vec![seg("a"), seg("b")]),
                not(Expr::Or(vec![seg("c"), seg("d")]))
            ])
        );
        assert_eq!(
            Expr::parse("a AnD b aNd c").unwrap(),
            Expr::And(vec![seg("a"), seg("b"), seg("c")])
        );
        assert_eq!(
            Expr::parse("(a AND b) AND (c)").unwrap(),
            Expr::And(vec![seg("a"), seg("b"), seg("c")])
        );
        assert_eq!(Expr::parse("not not x").unwrap(), not(not(seg("x"))));
    }

    #[test]
    fn names_quotes_and_keywords() {
        assert_eq!(
            Expr::parse("\"and\" OR \"NOT\" or x:y.z-1_2").unwrap(),
            Expr::Or(vec![seg("and"), seg("NOT"), seg("x:y.z-1_2")])
        );
        assert_eq!(Expr::parse("android").unwrap(), seg("android"));
        assert_eq!(Expr::parse("(sports)").unwrap(), seg("sports"));
        assert_eq!(
            Expr::Or(vec![seg("and"), not(seg("Or"))]).to_string(),
            "\"and\" OR NOT \"Or\""
        );
    }

    fn err(text: &str) -> ExprError {
        Expr::parse(text).unwrap_err()
    }

    #[test]
    fn errors_carry_the_position() {
        assert_eq!(err("").reason, ExprErrorReason::Empty);
        assert_eq!(err("   ").reason, ExprErrorReason::Empty);
        let e = err("a AND");
        assert_eq!(e.at, 5);
        assert_eq!(
            e.to_string(),
            "invalid expression at position 5: expected a segment name, NOT or '(' but found the end of the expression"
        );
        let e = err("a b");
        assert_eq!(
            (e.at, e.reason),
            (
                2,
                ExprErrorReason::ExpectedOperator {
                    found: "segment \"b\"".into()
                }
            )
        );
        let e = err("(a OR b");
        assert_eq!(e.at, 7);
        assert!(matches!(
            e.reason,
            ExprErrorReason::Unclosed { open: 0, .. }
        ));
        assert_eq!(err("a)").at, 1);
        assert_eq!(err("a AND (").at, 7);
        assert_eq!(
            err("a & b"),
            ExprError {
                at: 2,
                reason: ExprErrorReason::BadChar('&')
            }
        );
        assert_eq!(err("a OR \"b").at, 5);
        assert_eq!(err("a OR \"b\"c").at, 8);
        // Bad characters inside quotes are reported where they are.
        let e = err("x OR \"b c\"");
        assert_eq!(e.at, 7);
        assert!(matches!(e.reason, ExprErrorReason::BadSegment(_)));
        assert!(matches!(
            err("\"\"").reason,
            ExprErrorReason::BadSegment(PairError::EmptySegment)
        ));
        assert!(matches!(
            err(&"s".repeat(129)).reason,
            ExprErrorReason::BadSegment(PairError::SegmentTooLong { len: 129 })
        ));
        // Positions count characters, not bytes.
        assert_eq!(err("a OR é").at, 5);
        assert!(matches!(
            err(&"a ".repeat(MAX_EXPR_BYTES)).reason,
            ExprErrorReason::TooLong { .. }
        ));
    }

    #[test]
    fn limits_on_references_and_depth() {
        let ok = vec!["s"; MAX_EXPR_SEGMENTS].join(" OR ");
        assert!(Expr::parse(&ok).is_ok());
        let bad = vec!["s"; MAX_EXPR_SEGMENTS + 1].join(" OR ");
        let e = err(&bad);
        assert_eq!(e.reason, ExprErrorReason::TooManySegments);
        assert_eq!(e.at, MAX_EXPR_SEGMENTS * 5);
        let deep_ok = format!(
            "{}x{}",
            "(".repeat(MAX_EXPR_DEPTH),
            ")".repeat(MAX_EXPR_DEPTH)
        );
        assert!(Expr::parse(&deep_ok).is_ok());
        let deep = format!(
            "{}x{}",
            "(".repeat(MAX_EXPR_DEPTH + 1),
            ")".repeat(MAX_EXPR_DEPTH + 1)
        );
        assert_eq!(err(&deep).reason, ExprErrorReason::TooDeep);
        assert_eq!(err(&"NOT ".repeat(3000)).reason, ExprErrorReason::TooDeep);
    }

    #[test]
    fn segments_are_distinct_in_order() {
        let e = Expr::parse("b AND (a OR NOT b) OR c AND a").unwrap();
        assert_eq!(e.segments(), vec!["b", "a", "c"]);
        let member = |s: &str| s == "a";
        assert!(!e.matches(&member));
        assert!(Expr::parse("a AND NOT b").unwrap().matches(&member));
    }

    fn arb_expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            "[a-c]".prop_map(Expr::Segment),
            Just(Expr::Segment("or".into())),
            Just(Expr::Segment("x.y:z-1".into())),
        ];
        leaf.prop_recursive(5, 40, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                proptest::collection::vec(inner.clone(), 2..4).prop_map(|v| join(v, Expr::And)),
                proptest::collection::vec(inner, 2..4).prop_map(|v| join(v, Expr::Or)),
            ]
        })
    }

    proptest! {
        /// The canonical text parses back to the same tree.
        #[test]
        fn display_round_trips(e in arb_expr()) {
            prop_assert_eq!(Expr::parse(&e.to_string()), Ok(e));
        }

        /// Extra parentheses, spacing and keyword case never change the meaning.
        #[test]
        fn spelling_does_not_change_meaning(e in arb_expr(), members in proptest::collection::vec(any::<bool>(), 5)) {
            let text = e.to_string().replace("AND", "and").replace("OR", "oR").replace(' ', "  ");
            let again = Expr::parse(&format!("( {text} )")).unwrap();
            let names = ["a", "b", "c", "or", "x.y:z-1"];
            let is_member = |s: &str| names.iter().position(|n| *n == s).is_some_and(|i| members[i]);
            prop_assert_eq!(again.matches(&is_member), e.matches(&is_member));
        }

        /// Random text never panics; any error points inside the text (or at its end).
        #[test]
        fn arbitrary_text_never_panics(text in "[ab()\" NOTandor&é]{0,40}") {
            if let Err(e) = Expr::parse(&text) {
                prop_assert!(e.at <= text.chars().count());
            }
        }
    }
}
