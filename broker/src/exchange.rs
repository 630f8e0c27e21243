//! Exchanges and their binding indexes: direct (hash map), fanout (list),
//! topic (a trie matching each word three ways: exact, `*`, `#`) and headers
//! (`x-match` all / any / all-with-x / any-with-x). Owned by the vhost's
//! topology; routing appends destinations to a caller's scratch vector.

use std::collections::HashMap;
use std::sync::Arc;
use warren_protocol::types::{AMQPValue, FieldTable};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "direct" => Kind::Direct,
            "fanout" => Kind::Fanout,
            "topic" => Kind::Topic,
            "headers" => Kind::Headers,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Fanout => "fanout",
            Kind::Topic => "topic",
            Kind::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub dest: Dest,
    pub key: String,
    pub args: FieldTable,
}

#[derive(Debug)]
pub struct Exchange {
    pub name: Arc<str>,
    pub kind: Kind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The `alternate-exchange` argument, if any.
    pub alternate: Option<String>,
    /// Every binding with this exchange as source (the source of truth).
    pub bindings: Vec<Binding>,
    index: Index,
}

#[derive(Debug)]
enum Index {
    Direct(HashMap<String, Vec<Dest>>),
    Fanout,
    Topic(Box<TopicNode>),
    Headers,
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: Kind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate = match arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        let index = match kind {
            Kind::Direct => Index::Direct(HashMap::new()),
            Kind::Fanout => Index::Fanout,
            Kind::Topic => Index::Topic(Box::default()),
            Kind::Headers => Index::Headers,
        };
        Exchange {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate,
            bindings: Vec::new(),
            index,
        }
    }

    /// Add a binding; false if it already existed.
    pub fn bind(&mut self, b: Binding) -> bool {
        if self.bindings.contains(&b) {
            return false;
        }
        match &mut self.index {
            Index::Direct(m) => m.entry(b.key.clone()).or_default().push(b.dest.clone()),
            Index::Topic(t) => t.insert(&words(&b.key), b.dest.clone()),
            Index::Fanout | Index::Headers => {}
        }
        self.bindings.push(b);
        true
    }

    /// Remove a binding; false if there was none.
    pub fn unbind(&mut self, b: &Binding) -> bool {
        let Some(pos) = self.bindings.iter().position(|x| x == b) else {
            return false;
        };
        self.bindings.remove(pos);
        // Another binding with the same key and destination but other
        // arguments keeps the index entry.
        let still = self
            .bindings
            .iter()
            .any(|x| x.dest == b.dest && x.key == b.key);
        if !still {
            match &mut self.index {
                Index::Direct(m) => {
                    if let Some(v) = m.get_mut(&b.key) {
                        v.retain(|d| d != &b.dest);
                        if v.is_empty() {
                            m.remove(&b.key);
                        }
                    }
                }
                Index::Topic(t) => t.remove(&words(&b.key), &b.dest),
                Index::Fanout | Index::Headers => {}
            }
        }
        true
    }

    /// Remove every binding to `dest`; returns how many went.
    pub fn unbind_dest(&mut self, dest: &Dest) -> usize {
        let gone: Vec<Binding> = self
            .bindings
            .iter()
            .filter(|b| &b.dest == dest)
            .cloned()
            .collect();
        for b in &gone {
            self.unbind(b);
        }
        gone.len()
    }

    /// Append the destinations for a message to `out` (may contain duplicates).
    pub fn route(&self, routing_key: &str, headers: Option<&FieldTable>, out: &mut Vec<Dest>) {
        match &self.index {
            Index::Direct(m) => {
                if let Some(v) = m.get(routing_key) {
                    out.extend(v.iter().cloned());
                }
            }
            Index::Fanout => {
                let mut seen: Vec<&Dest> = Vec::with_capacity(self.bindings.len());
                for b in &self.bindings {
                    if !seen.contains(&&b.dest) {
                        seen.push(&b.dest);
                        out.push(b.dest.clone());
                    }
                }
            }
            Index::Topic(t) => {
                let mut ws: Vec<&str> = Vec::with_capacity(8);
                if !routing_key.is_empty() {
                    ws.extend(routing_key.split('.'));
                }
                t.matches(&ws, out);
            }
            Index::Headers => {
                let empty = FieldTable::default();
                let h = headers.unwrap_or(&empty);
                for b in &self.bindings {
                    if headers_match(&b.args, h) {
                        out.push(b.dest.clone());
                    }
                }
            }
        }
    }
}

fn words(key: &str) -> Vec<String> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').map(str::to_owned).collect()
    }
}

/// A topic trie node: exact children, a `*` child, a `#` child, and the
/// destinations of binding keys ending here.
#[derive(Debug, Default)]
pub struct TopicNode {
    children: HashMap<String, TopicNode>,
    star: Option<Box<TopicNode>>,
    hash: Option<Box<TopicNode>>,
    dests: Vec<Dest>,
}

impl TopicNode {
    fn insert(&mut self, ws: &[String], dest: Dest) {
        match ws.split_first() {
            None => {
                if !self.dests.contains(&dest) {
                    self.dests.push(dest)
                }
            }
            Some((w, rest)) => {
                let child = match w.as_str() {
                    "*" => self.star.get_or_insert_with(Box::default),
                    "#" => self.hash.get_or_insert_with(Box::default),
                    _ => self.children.entry(w.clone()).or_default(),
                };
                child.insert(rest, dest)
            }
        }
    }

    fn remove(&mut self, ws: &[String], dest: &Dest) {
        match ws.split_first() {
            None => self.dests.retain(|d| d != dest),
            Some((w, rest)) => {
                let child = match w.as_str() {
                    "*" => self.star.as_deref_mut(),
                    "#" => self.hash.as_deref_mut(),
                    _ => self.children.get_mut(w.as_str()),
                };
                if let Some(c) = child {
                    c.remove(rest, dest);
                    if c.is_empty() {
                        match w.as_str() {
                            "*" => self.star = None,
                            "#" => self.hash = None,
                            _ => {
                                self.children.remove(w.as_str());
                            }
                        }
                    }
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.dests.is_empty()
            && self.children.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }

    fn matches(&self, ws: &[&str], out: &mut Vec<Dest>) {
        match ws.split_first() {
            None => out.extend(self.dests.iter().cloned()),
            Some((w, rest)) => {
                if let Some(c) = self.children.get(*w) {
                    c.matches(rest, out);
                }
                if let Some(s) = &self.star {
                    s.matches(rest, out);
                }
            }
        }
        // `#` swallows zero or more words.
        if let Some(h) = &self.hash {
            for i in 0..=ws.len() {
                h.matches(&ws[i..], out);
            }
        }
    }
}

/// A value normalised for RabbitMQ-style comparison: numbers compare by value
/// whatever their wire type.
#[derive(PartialEq)]
enum Norm<'a> {
    Int(i128),
    Float(f64),
    Bytes(&'a [u8]),
    Other(&'a AMQPValue),
}

fn norm(v: &AMQPValue) -> Norm<'_> {
    match v {
        AMQPValue::ShortShortInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortShortUInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortInt(x) => Norm::Int(*x as i128),
        AMQPValue::ShortUInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongUInt(x) => Norm::Int(*x as i128),
        AMQPValue::LongLongInt(x) => Norm::Int(*x as i128),
        AMQPValue::Timestamp(x) => Norm::Int(*x as i128),
        AMQPValue::Float(x) => Norm::Float(*x as f64),
        AMQPValue::Double(x) => Norm::Float(*x),
        AMQPValue::LongString(s) => Norm::Bytes(s.as_bytes()),
        AMQPValue::ShortString(s) => Norm::Bytes(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Norm::Bytes(b.as_slice()),
        other => Norm::Other(other),
    }
}

/// An integer field value, whatever its wire width.
pub fn as_int(v: &AMQPValue) -> Option<i128> {
    match norm(v) {
        Norm::Int(i) => Some(i),
        _ => None,
    }
}

/// Whether two field values are equal in RabbitMQ's sense.
pub fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (norm(a), norm(b)) {
        (Norm::Int(x), Norm::Float(y)) | (Norm::Float(y), Norm::Int(x)) => x as f64 == y,
        (x, y) => x == y,
    }
}

/// A headers binding's `x-match` must be one RabbitMQ knows (406 otherwise).
pub fn check_x_match(args: &FieldTable) -> crate::error::AmqpResult<()> {
    let v = match args.inner().get("x-match") {
        None => return Ok(()),
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        Some(other) => format!("{other:?}"),
    };
    match v.as_str() {
        "all" | "any" | "all-with-x" | "any-with-x" => Ok(()),
        _ => Err(crate::error::precondition(format!(
            "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
        ))),
    }
}

/// Headers-exchange matching of a binding's arguments against message headers.
pub fn headers_match(args: &FieldTable, headers: &FieldTable) -> bool {
    let mode = match args.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let mut considered = 0;
    for (k, v) in args.inner() {
        let key = k.as_str();
        if key == "x-match" || (!with_x && key.starts_with("x-")) {
            continue;
        }
        considered += 1;
        let hit = match headers.inner().get(key) {
            None => false,
            // A void binding value matches on presence alone.
            Some(_) if matches!(v, AMQPValue::Void) => true,
            Some(h) => values_equal(v, h),
        };
        if any && hit {
            return true;
        }
        if !any && !hit {
            return false;
        }
    }
    // "all" with nothing to compare matches; "any" with nothing does not.
    let _ = considered;
    !any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: &str) -> Dest {
        Dest::Queue(n.into())
    }

    fn topic_route(bindings: &[(&str, &str)], key: &str) -> Vec<Dest> {
        let mut e = Exchange::new("t", Kind::Topic, false, false, false, FieldTable::default());
        for (k, d) in bindings {
            e.bind(Binding {
                dest: q(d),
                key: k.to_string(),
                args: FieldTable::default(),
            });
        }
        let mut out = vec![];
        e.route(key, None, &mut out);
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn topic_words() {
        let b = [
            ("a.*.c", "1"),
            ("a.#", "2"),
            ("#", "3"),
            ("*", "4"),
            ("a.#.c", "5"),
            ("", "6"),
            ("#.c", "7"),
        ];
        assert_eq!(
            topic_route(&b, "a.b.c"),
            vec![q("1"), q("2"), q("3"), q("5"), q("7")]
        );
        assert_eq!(topic_route(&b, "a"), vec![q("2"), q("3"), q("4")]);
        assert_eq!(topic_route(&b, ""), vec![q("3"), q("6")]);
        assert_eq!(topic_route(&b, "a.c"), vec![q("2"), q("3"), q("5"), q("7")]);
        assert_eq!(topic_route(&b, "x.y"), vec![q("3")]);
    }

    #[test]
    fn topic_unbind_prunes() {
        let mut e = Exchange::new("t", Kind::Topic, false, false, false, FieldTable::default());
        let b = Binding {
            dest: q("1"),
            key: "a.*.#".into(),
            args: FieldTable::default(),
        };
        e.bind(b.clone());
        assert!(e.unbind(&b));
        let mut out = vec![];
        e.route("a.b.c", None, &mut out);
        assert!(out.is_empty());
        match &e.index {
            Index::Topic(t) => assert!(t.is_empty()),
            _ => unreachable!(),
        }
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn headers_modes() {
        let s = |x: &str| AMQPValue::LongString(x.into());
        let h = table(&[("a", s("1")), ("b", AMQPValue::LongInt(2)), ("x-k", s("v"))]);
        assert!(headers_match(
            &table(&[("a", s("1")), ("b", AMQPValue::LongLongInt(2))]),
            &h
        ));
        assert!(!headers_match(&table(&[("a", s("1")), ("c", s("3"))]), &h));
        assert!(headers_match(
            &table(&[
                ("x-match", s("any")),
                ("a", s("9")),
                ("b", AMQPValue::ShortInt(2))
            ]),
            &h
        ));
        assert!(!headers_match(
            &table(&[("x-match", s("any")), ("a", s("9"))]),
            &h
        ));
        assert!(
            headers_match(&table(&[("x-k", s("other"))]), &h),
            "x- keys ignored by all"
        );
        assert!(!headers_match(
            &table(&[("x-match", s("all-with-x")), ("x-k", s("other"))]),
            &h
        ));
        assert!(headers_match(
            &table(&[("x-match", s("any-with-x")), ("x-k", s("v"))]),
            &h
        ));
        assert!(headers_match(&table(&[("a", AMQPValue::Void)]), &h));
        assert!(
            headers_match(&FieldTable::default(), &h),
            "empty all matches"
        );
        assert!(
            !headers_match(&table(&[("x-match", s("any"))]), &h),
            "empty any does not"
        );
    }
}
