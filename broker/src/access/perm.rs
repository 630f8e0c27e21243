//! Permissions as RabbitMQ's internal authorisation backend checks them:
//! three regular expressions per (user, vhost), for configure, write and
//! read, matched anywhere in the resource's name (unanchored, as Erlang's
//! `re:run`); an empty pattern matches nothing; the default exchange is
//! matched by the name `amq.default`. Topic permissions are write and read
//! patterns on routing keys per (user, vhost, exchange), where `{username}`
//! and `{vhost}` stand for the user's and the vhost's names.

use regex::Regex;

/// What an operation needs on a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    Configure,
    Write,
    Read,
}

/// The kinds of resource permissions apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Exchange,
    Queue,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exchange => "exchange",
            Kind::Queue => "queue",
        }
    }
}

/// A permission pattern: its text as given and its compiled form.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    re: Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Pattern {
    /// Compile a pattern; a bad one is refused with the reason.
    pub fn new(source: &str) -> Result<Pattern, String> {
        // An empty pattern means "nothing" (RabbitMQ reads it as "^$").
        let effective = if source.is_empty() { "^$" } else { source };
        let re = Regex::new(effective)
            .map_err(|e| format!("invalid regular expression '{source}': {e}"))?;
        Ok(Pattern {
            source: source.to_owned(),
            re,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.re.is_match(name)
    }
}

/// A user's permissions in one vhost.
#[derive(Clone, Debug, PartialEq)]
pub struct Permission {
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
}

impl Permission {
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permission, String> {
        Ok(Permission {
            configure: Pattern::new(configure)?,
            write: Pattern::new(write)?,
            read: Pattern::new(read)?,
        })
    }

    /// Whether `perm` is granted on the resource called `name`.
    pub fn allows(&self, perm: Perm, name: &str) -> bool {
        let name = if name.is_empty() { "amq.default" } else { name };
        let p = match perm {
            Perm::Configure => &self.configure,
            Perm::Write => &self.write,
            Perm::Read => &self.read,
        };
        p.matches(name)
    }
}

/// A user's topic permissions on one exchange of one vhost. The patterns
/// hold the variables unexpanded; they are expanded per check.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicPermission {
    pub write: String,
    pub read: String,
}

impl TopicPermission {
    /// Check the patterns compile (with the variables in place).
    pub fn new(write: &str, read: &str) -> Result<TopicPermission, String> {
        for p in [write, read] {
            Pattern::new(&expand(p, "user", "vhost"))?;
        }
        Ok(TopicPermission {
            write: write.to_owned(),
            read: read.to_owned(),
        })
    }

    /// Whether `perm` (write or read) is granted on `routing_key`.
    pub fn allows(&self, perm: Perm, routing_key: &str, user: &str, vhost: &str) -> bool {
        let source = match perm {
            Perm::Write => &self.write,
            Perm::Read => &self.read,
            Perm::Configure => return true,
        };
        match Pattern::new(&expand(source, user, vhost)) {
            Ok(p) => p.matches(routing_key),
            Err(_) => false,
        }
    }
}

/// Replace `{username}` and `{vhost}` by the names, with regex
/// metacharacters in them escaped (a user called `a.b` matches `a.b` only).
fn expand(pattern: &str, user: &str, vhost: &str) -> String {
    pattern
        .replace("{username}", &regex::escape(user))
        .replace("{vhost}", &regex::escape(vhost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_rabbitmq() {
        let p = Permission::new(".*", "^app\\.", "").unwrap();
        assert!(p.allows(Perm::Configure, "anything"));
        assert!(p.allows(Perm::Write, "app.orders"));
        assert!(!p.allows(Perm::Write, "xapp.orders"));
        // Unanchored: matches anywhere.
        let q = Permission::new("orders", "orders", "orders").unwrap();
        assert!(q.allows(Perm::Read, "my-orders-1"));
        // Empty: nothing, not even the empty name.
        assert!(!p.allows(Perm::Read, "x"));
        assert!(!p.allows(Perm::Read, ""));
        // The default exchange is amq.default.
        let d = Permission::new("", "^amq\\.default$", "").unwrap();
        assert!(d.allows(Perm::Write, ""));
        assert!(Permission::new("(", ".*", ".*")
            .unwrap_err()
            .contains("invalid regular expression '('"));
    }

    #[test]
    fn topic_patterns_expand_variables() {
        let t = TopicPermission::new("^{username}\\.", "^{vhost}-").unwrap();
        assert!(t.allows(Perm::Write, "alice.x", "alice", "/"));
        assert!(!t.allows(Perm::Write, "bob.x", "alice", "/"));
        assert!(!t.allows(Perm::Write, "aXlice.x", "a.lice", "/"));
        assert!(t.allows(Perm::Read, "prod-x", "alice", "prod"));
        assert!(TopicPermission::new("[", "").is_err());
    }
}
