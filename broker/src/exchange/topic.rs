//! The topic exchange: binding keys are dot-separated words where `*`
//! matches one word and `#` zero or more. The index is a trie matching each
//! word three ways (exact, `*`, `#`), as RabbitMQ's.

use super::{any_arguments, any_binding, Binding, Dest, ExchangeType, Index, Msg};
use std::collections::HashMap;

pub static TYPE: ExchangeType = ExchangeType {
    name: "topic",
    uses_headers: false,
    new_index: |_| Box::<TopicNode>::default(),
    check_binding: any_binding,
    check_arguments: any_arguments,
};

fn words(key: &str) -> Vec<String> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').map(str::to_owned).collect()
    }
}

impl Index for TopicNode {
    fn bind(&mut self, b: &Binding) {
        self.insert(&words(&b.key), b.dest.clone());
    }

    fn unbind(&mut self, b: &Binding) {
        self.remove(&words(&b.key), &b.dest);
    }

    fn route(&self, _: &[Binding], m: &Msg<'_>, out: &mut Vec<Dest>) {
        let key = m.routing_key;
        let mut ws: Vec<&str> = Vec::with_capacity(8);
        if !key.is_empty() {
            ws.extend(key.split('.'));
        }
        self.matches(&ws, out);
    }
}

/// A topic trie node: exact children, a `*` child, a `#` child, and the
/// destinations of binding keys ending here.
#[derive(Debug, Default)]
struct TopicNode {
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

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::types::FieldTable;

    fn q(n: &str) -> Dest {
        Dest::Queue(n.into())
    }

    fn binding(key: &str, dest: &str) -> Binding {
        Binding {
            dest: q(dest),
            key: key.to_string(),
            args: FieldTable::default(),
        }
    }

    fn topic_route(bindings: &[(&str, &str)], key: &str) -> Vec<Dest> {
        let mut t = TopicNode::default();
        for (k, d) in bindings {
            t.bind(&binding(k, d));
        }
        let mut out = vec![];
        let m = Msg {
            routing_key: key,
            headers: None,
            header: None,
        };
        t.route(&[], &m, &mut out);
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
        let mut t = TopicNode::default();
        let b = binding("a.*.#", "1");
        t.bind(&b);
        t.unbind(&b);
        let mut out = vec![];
        let m = Msg {
            routing_key: "a.b.c",
            headers: None,
            header: None,
        };
        t.route(&[], &m, &mut out);
        assert!(out.is_empty());
        assert!(t.is_empty());
    }
}
