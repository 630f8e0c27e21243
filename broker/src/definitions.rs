//! Definitions files in RabbitMQ's JSON format: users (with their password
//! hashes), vhosts, permissions, topic permissions, exchanges, queues and
//! bindings, so that a file exported by `rabbitmqctl export_definitions`
//! imports here and Warren's export imports into RabbitMQ.
//!
//! Import is all or nothing: every item is checked first, against the
//! broker and against the rest of the file, and a file with any invalid
//! item changes nothing (every problem is reported, each naming its item).
//! It never overwrites: an item that already exists is left as it is and
//! reported as skipped. Users, vhosts and permissions are stored in one
//! atomic batch; exchanges, queues and bindings are then declared in that
//! order.
//!
//! Policies and operator policies (RabbitMQ exports the latter as runtime
//! parameters of the `operator_policy` component) are imported with the
//! users, in the same batch, and put in force before the topology is
//! declared. What Warren does not implement yet is refused, not ignored:
//! runtime parameters other than vhost limits and operator policies, queue
//! types other than classic, policy keys Warren lacks.

use crate::access::{self, limits, password::Algorithm, Limits};
use crate::broker::Broker;
use crate::exchange::{self, Dest};
use crate::vhost::{ExchangeSpec, QueueSpec};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use warren_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use warren_storage::Definitions;

/// The version Warren writes as `rabbit_version`: RabbitMQ's import checks
/// nothing of it, and tools read it as the format's version.
const RABBIT_VERSION: &str = "3.10.8";

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    pub created: Vec<String>,
    /// Items that already existed (left unchanged).
    pub skipped: Vec<String>,
}

// ------------------------------------------------------------ the file

#[derive(Debug, Default)]
struct File {
    users: Vec<UserDef>,
    vhosts: Vec<VhostDef>,
    permissions: Vec<PermDef>,
    topic_permissions: Vec<TopicDef>,
    /// Policies, then operator policies (`true`), validated.
    policies: Vec<(crate::policy::Policy, bool)>,
    exchanges: Vec<ExchangeItem>,
    queues: Vec<QueueItem>,
    bindings: Vec<BindingItem>,
}

#[derive(Debug)]
struct UserDef {
    name: String,
    password_hash: String,
    algorithm: Algorithm,
    tags: Vec<String>,
    limits: Limits,
}

#[derive(Debug)]
struct VhostDef {
    name: String,
    description: String,
    tags: Vec<String>,
    limits: Limits,
}

#[derive(Debug)]
struct PermDef {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

#[derive(Debug)]
struct TopicDef {
    user: String,
    vhost: String,
    exchange: String,
    write: String,
    read: String,
}

#[derive(Debug)]
struct ExchangeItem {
    vhost: String,
    name: String,
    kind: String,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
}

#[derive(Debug)]
struct QueueItem {
    vhost: String,
    name: String,
    durable: bool,
    auto_delete: bool,
    arguments: FieldTable,
}

#[derive(Debug)]
struct BindingItem {
    vhost: String,
    source: String,
    destination: String,
    to_queue: bool,
    routing_key: String,
    arguments: FieldTable,
}

/// Top-level keys of RabbitMQ's format.
const KEYS: &[&str] = &[
    "rabbit_version",
    "rabbitmq_version",
    "product_name",
    "product_version",
    "users",
    "vhosts",
    "permissions",
    "topic_permissions",
    "parameters",
    "global_parameters",
    "policies",
    "queues",
    "exchanges",
    "bindings",
];

/// One item of a list: its fields, and a label for errors.
struct Item<'a> {
    label: String,
    map: &'a Map<String, Value>,
}

impl Item<'_> {
    fn str(&self, key: &str) -> Result<String, String> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "{}: '{key}' must be a string, not {other}",
                self.label
            )),
            None => Err(format!("{}: '{key}' is missing", self.label)),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default.to_owned()),
            _ => self.str(key),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!(
                "{}: '{key}' must be true or false, not {other}",
                self.label
            )),
        }
    }
    fn table(&self, key: &str) -> Result<FieldTable, String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(FieldTable::default()),
            Some(Value::Object(m)) => {
                json_table(m).map_err(|e| format!("{}: '{key}': {e}", self.label))
            }
            Some(other) => Err(format!(
                "{}: '{key}' must be an object, not {other}",
                self.label
            )),
        }
    }
    /// Limits as an object (`{"max-connections": 5}`) or as RabbitMQ's
    /// vhost export writes them (`[["max-connections", 5]]`).
    fn limits(&self, allowed: &[&str]) -> Result<Limits, String> {
        let bad = |e: String| format!("{}: limits: {e}", self.label);
        let int = |name: &str, v: &Value| {
            v.as_i64()
                .ok_or_else(|| bad(format!("'{name}' must be an integer, not {v}")))
        };
        let mut pairs = Vec::new();
        match self.map.get("limits") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    pairs.push((k.clone(), int(k, v)?));
                }
            }
            Some(Value::Array(list)) => {
                for pair in list {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([Value::String(k), v]) => pairs.push((k.clone(), int(k, v)?)),
                        _ => return Err(bad(format!("{pair} is not a [name, value] pair"))),
                    }
                }
            }
            Some(other) => return Err(bad(format!("must be an object, not {other}"))),
        }
        Limits::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), *v)), allowed).map_err(bad)
    }

    /// A policy: `self` names it (vhost, name), `body` holds the pattern,
    /// apply-to, priority and definition (the same item for a policy; the
    /// parameter's value for an operator policy). The definition may be an
    /// object or, as RabbitMQ exports operator policies, a list of pairs.
    fn policy(&self, body: &Item<'_>, operator: bool) -> Result<crate::policy::Policy, String> {
        let bad = |e: String| format!("{}: {e}", self.label);
        let priority = match body.map.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| bad(format!("'priority' must be an integer, not {v}")))?,
        };
        let definition = match body.map.get("definition") {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::Array(list)) => {
                let mut m = Map::new();
                for pair in list {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([Value::String(k), v]) => {
                            m.insert(k.clone(), v.clone());
                        }
                        _ => return Err(bad(format!("{pair} is not a [key, value] pair"))),
                    }
                }
                m
            }
            Some(other) => return Err(bad(format!("'definition' must be an object, not {other}"))),
            None => return Err(bad("'definition' is missing".into())),
        };
        crate::policy::Policy::new(
            &self.str("vhost")?,
            &self.str("name")?,
            &body.str("pattern")?,
            &body.str_or("apply-to", "all")?,
            priority,
            definition,
            operator,
        )
        .map_err(|e| bad(e.trim_end().replace("\n\n", ": ")))
    }

    fn tags(&self) -> Result<Vec<String>, String> {
        // RabbitMQ 3.9+ writes a list; older versions a comma-separated string.
        match self.map.get("tags") {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::String(s)) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "{}: a tag must be a string, not {other}",
                        self.label
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{}: 'tags' must be a list, not {other}",
                self.label
            )),
        }
    }
}

fn items<'a>(
    root: &'a Map<String, Value>,
    key: &str,
    errors: &mut Vec<String>,
    label: impl Fn(usize, &Map<String, Value>) -> String,
) -> Vec<Item<'a>> {
    match root.get(key) {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Value::Object(map) => Some(Item {
                    label: label(i, map),
                    map,
                }),
                other => {
                    errors.push(format!("{key}[{i}]: must be an object, not {other}"));
                    None
                }
            })
            .collect(),
        Some(other) => {
            errors.push(format!("'{key}' must be a list, not {other}"));
            vec![]
        }
    }
}

fn named(kind: &'static str) -> impl Fn(usize, &Map<String, Value>) -> String {
    move |i, m| match (m.get("name"), m.get("vhost")) {
        (Some(Value::String(n)), Some(Value::String(v))) => {
            format!("{kind} '{n}' in vhost '{v}'")
        }
        (Some(Value::String(n)), _) => format!("{kind} '{n}'"),
        _ => format!("{kind} #{}", i + 1),
    }
}

/// Parse a definitions file; every problem is listed.
fn parse(json: &[u8]) -> Result<File, Vec<String>> {
    let root: Value =
        serde_json::from_slice(json).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let Value::Object(root) = root else {
        return Err(vec!["the file must hold a JSON object".into()]);
    };
    let mut errors = Vec::new();
    for k in root.keys() {
        if !KEYS.contains(&k.as_str()) {
            errors.push(format!("unknown key '{k}'"));
        }
    }
    let mut f = File::default();
    let mut vhost_limit_params: Vec<(String, Limits)> = Vec::new();
    for it in items(&root, "users", &mut errors, named("user")) {
        let r = (|| {
            let algorithm =
                Algorithm::parse(it.map.get("hashing_algorithm").and_then(Value::as_str))
                    .map_err(|e| format!("{}: {e}", it.label))?;
            Ok(UserDef {
                name: it.str("name")?,
                password_hash: it.str_or("password_hash", "")?,
                algorithm,
                tags: it.tags()?,
                limits: it.limits(limits::USER_LIMITS)?,
            })
        })();
        push(&mut f.users, r, &mut errors);
    }
    for it in items(&root, "vhosts", &mut errors, named("vhost")) {
        let r = (|| {
            let meta = it.map.get("metadata").and_then(Value::as_object);
            // Only classic queues exist here: another default is refused.
            let default_type = meta
                .and_then(|m| m.get("default_queue_type"))
                .or_else(|| it.map.get("default_queue_type"));
            match default_type.and_then(Value::as_str) {
                None | Some("classic") | Some("undefined") => {}
                Some(t) => {
                    return Err(format!(
                        "{}: default queue type '{t}' is not supported by Warren yet",
                        it.label
                    ))
                }
            }
            let description = match meta.and_then(|m| m.get("description")) {
                Some(Value::String(s)) => s.clone(),
                _ => it.str_or("description", "")?,
            };
            let tags = match meta.map(|m| Item {
                label: it.label.clone(),
                map: m,
            }) {
                Some(m) => m.tags()?,
                None => it.tags()?,
            };
            Ok(VhostDef {
                name: it.str("name")?,
                description,
                tags,
                limits: it.limits(limits::VHOST_LIMITS)?,
            })
        })();
        push(&mut f.vhosts, r, &mut errors);
    }
    let perm_label = |kind: &'static str| {
        move |i: usize, m: &Map<String, Value>| match (m.get("user"), m.get("vhost")) {
            (Some(Value::String(u)), Some(Value::String(v))) => {
                format!("{kind} of user '{u}' in vhost '{v}'")
            }
            _ => format!("{kind} #{}", i + 1),
        }
    };
    for it in items(&root, "permissions", &mut errors, perm_label("permissions")) {
        let r = (|| {
            Ok(PermDef {
                user: it.str("user")?,
                vhost: it.str("vhost")?,
                configure: it.str("configure")?,
                write: it.str("write")?,
                read: it.str("read")?,
            })
        })();
        push(&mut f.permissions, r, &mut errors);
    }
    for it in items(
        &root,
        "topic_permissions",
        &mut errors,
        perm_label("topic permissions"),
    ) {
        let r = (|| {
            Ok(TopicDef {
                user: it.str("user")?,
                vhost: it.str("vhost")?,
                exchange: it.str("exchange")?,
                write: it.str("write")?,
                read: it.str("read")?,
            })
        })();
        push(&mut f.topic_permissions, r, &mut errors);
    }
    for it in items(&root, "policies", &mut errors, named("policy")) {
        let r = it.policy(&it, false);
        push(&mut f.policies, r.map(|p| (p, false)), &mut errors);
    }
    for it in items(&root, "parameters", &mut errors, named("parameter")) {
        // RabbitMQ exports vhost limits twice: in the vhost and as this
        // parameter. They must agree with the vhost's.
        let component = it.map.get("component").and_then(Value::as_str);
        if component == Some("operator_policy") {
            let r = match it.map.get("value").and_then(Value::as_object) {
                Some(value) => it.policy(
                    &Item {
                        label: it.label.clone(),
                        map: value,
                    },
                    true,
                ),
                None => Err(format!("{}: 'value' must be an object", it.label)),
            };
            push(&mut f.policies, r.map(|p| (p, true)), &mut errors);
            continue;
        }
        if component != Some("vhost-limits") {
            errors.push(format!(
                "{}: runtime parameters ({}) are not supported by Warren yet",
                it.label,
                component.unwrap_or("?")
            ));
            continue;
        }
        let r = (|| {
            let vhost = it.str("vhost")?;
            let value = it
                .map
                .get("value")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("{}: 'value' must be an object", it.label))?;
            let mut wrapped = Map::new();
            wrapped.insert("limits".into(), Value::Object(value.clone()));
            let limits = Item {
                label: it.label.clone(),
                map: &wrapped,
            }
            .limits(limits::VHOST_LIMITS)?;
            Ok((vhost, limits))
        })();
        match r {
            Ok(pair) => vhost_limit_params.push(pair),
            Err(e) => errors.push(e),
        }
    }
    for (vhost, l) in &vhost_limit_params {
        match f.vhosts.iter_mut().find(|v| &v.name == vhost) {
            Some(v) if v.limits.is_empty() => v.limits = *l,
            Some(v) if v.limits == *l => {}
            Some(_) => errors.push(format!(
                "vhost '{vhost}': its limits and its vhost-limits parameter differ"
            )),
            None => errors.push(format!(
                "vhost-limits parameter of vhost '{vhost}': the vhost is not in the file"
            )),
        }
    }
    for it in items(
        &root,
        "global_parameters",
        &mut errors,
        named("global parameter"),
    ) {
        // RabbitMQ's own cluster id: meaningless to another node.
        if it.map.get("name").and_then(Value::as_str) != Some("internal_cluster_id") {
            errors.push(format!(
                "{}: global parameters are not supported by Warren yet",
                it.label
            ));
        }
    }
    for it in items(&root, "exchanges", &mut errors, named("exchange")) {
        let r = (|| {
            Ok(ExchangeItem {
                vhost: it.str("vhost")?,
                name: it.str("name")?,
                kind: it.str("type")?,
                durable: it.bool_or("durable", true)?,
                auto_delete: it.bool_or("auto_delete", false)?,
                internal: it.bool_or("internal", false)?,
                arguments: it.table("arguments")?,
            })
        })();
        push(&mut f.exchanges, r, &mut errors);
    }
    for it in items(&root, "queues", &mut errors, named("queue")) {
        let r = (|| {
            match it.map.get("type").and_then(Value::as_str) {
                None | Some("classic") => {}
                Some(t) => {
                    return Err(format!(
                        "{}: queue type '{t}' is not supported by Warren yet",
                        it.label
                    ))
                }
            }
            let arguments = it.table("arguments")?;
            if let Some(AMQPValue::LongString(t)) = arguments.inner().get("x-queue-type") {
                if t.as_bytes() != b"classic" {
                    return Err(format!(
                        "{}: queue type '{}' is not supported by Warren yet",
                        it.label,
                        String::from_utf8_lossy(t.as_bytes())
                    ));
                }
            }
            Ok(QueueItem {
                vhost: it.str("vhost")?,
                name: it.str("name")?,
                durable: it.bool_or("durable", true)?,
                auto_delete: it.bool_or("auto_delete", false)?,
                arguments,
            })
        })();
        push(&mut f.queues, r, &mut errors);
    }
    let binding_label = |i: usize, m: &Map<String, Value>| {
        let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
        format!(
            "binding #{} from exchange '{}' to {} '{}' in vhost '{}'",
            i + 1,
            s("source"),
            s("destination_type"),
            s("destination"),
            s("vhost")
        )
    };
    for it in items(&root, "bindings", &mut errors, binding_label) {
        let r = (|| {
            let to_queue = match it.str("destination_type")?.as_str() {
                "queue" => true,
                "exchange" => false,
                other => {
                    return Err(format!(
                        "{}: destination_type must be queue or exchange, not '{other}'",
                        it.label
                    ))
                }
            };
            Ok(BindingItem {
                vhost: it.str("vhost")?,
                source: it.str("source")?,
                destination: it.str("destination")?,
                to_queue,
                routing_key: it.str_or("routing_key", "")?,
                arguments: it.table("arguments")?,
            })
        })();
        push(&mut f.bindings, r, &mut errors);
    }
    if errors.is_empty() {
        Ok(f)
    } else {
        Err(errors)
    }
}

fn push<T>(list: &mut Vec<T>, r: Result<T, String>, errors: &mut Vec<String>) {
    match r {
        Ok(v) => list.push(v),
        Err(e) => errors.push(e),
    }
}

/// A JSON object as an AMQP field table (numbers without a fraction are
/// 64-bit integers, as RabbitMQ reads them).
pub fn json_table(m: &Map<String, Value>) -> Result<FieldTable, String> {
    let mut t = FieldTable::default();
    for (k, v) in m {
        if k.len() > 255 {
            return Err(format!("argument name '{k}' is longer than 255 bytes"));
        }
        t.insert(k.as_str().into(), json_value(v)?);
    }
    Ok(t)
}

fn json_value(v: &Value) -> Result<AMQPValue, String> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => match n.as_f64() {
                Some(f) => AMQPValue::Double(f),
                None => return Err(format!("number {n} is out of range")),
            },
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(a) => {
            let mut out = FieldArray::default();
            for x in a {
                out.push(json_value(x)?);
            }
            AMQPValue::FieldArray(out)
        }
        Value::Object(m) => AMQPValue::FieldTable(json_table(m)?),
    })
}

/// An AMQP field table as a JSON object (the inverse of [`json_table`]).
pub fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

// ------------------------------------------------------------ import

/// Import a definitions file into a running broker. All or nothing: on any
/// invalid item, every problem is returned and nothing changes.
pub async fn import(broker: &Broker, json: &[u8]) -> Result<Report, Vec<String>> {
    let f = parse(json)?;
    let mut report = Report::default();
    let mut errors = Vec::new();
    let state = broker.access.snapshot();

    // Which vhosts, users and exchanges exist once the file is in.
    let vhosts: BTreeSet<&str> = state
        .vhosts
        .keys()
        .map(String::as_str)
        .chain(f.vhosts.iter().map(|v| v.name.as_str()))
        .collect();
    let has_vhost = |v: &str, label: &str, errors: &mut Vec<String>| {
        let ok = vhosts.contains(v);
        if !ok {
            errors.push(format!("{label}: vhost '{v}' does not exist"));
        }
        ok
    };

    // Check access items on a copy of the state: the same code that applies
    // them, so what passes here applies.
    let mut scratch = (*state).clone();
    let mut ops = Vec::new();
    // An item is checked even where it exists and is skipped: a file with
    // a bad item is refused whatever the node holds.
    for u in &f.users {
        if let Err(e) = access::password::validate(u.algorithm, &u.password_hash) {
            errors.push(format!("user '{}': {e}", u.name));
        } else if state.users.contains_key(&u.name) {
            report.skipped.push(format!("user '{}'", u.name));
        } else if let Err(e) = access::add_user(
            &mut scratch,
            &mut ops,
            &u.name,
            u.password_hash.clone(),
            u.algorithm,
            u.tags.clone(),
        )
        .and_then(|()| access::set_user_limits(&mut scratch, &mut ops, &u.name, u.limits))
        {
            errors.push(format!("user '{}': {e}", u.name));
        }
    }
    for v in &f.vhosts {
        if state.vhosts.contains_key(&v.name) {
            report.skipped.push(format!("vhost '{}'", v.name));
        } else if let Err(e) = access::add_vhost(
            &mut scratch,
            &mut ops,
            &v.name,
            &v.description,
            v.tags.clone(),
        )
        .and_then(|()| access::set_vhost_limits(&mut scratch, &mut ops, &v.name, v.limits))
        {
            errors.push(format!("vhost '{}': {e}", v.name));
        }
    }
    for p in &f.permissions {
        let label = format!("permissions of user '{}' in vhost '{}'", p.user, p.vhost);
        if let Err(e) = access::Permission::new(&p.configure, &p.write, &p.read) {
            errors.push(format!("{label}: {e}"));
        } else if state
            .permissions
            .contains_key(&(p.vhost.clone(), p.user.clone()))
        {
            report.skipped.push(label);
        } else if let Err(e) = access::set_permissions(
            &mut scratch,
            &mut ops,
            &p.user,
            &p.vhost,
            &p.configure,
            &p.write,
            &p.read,
        ) {
            errors.push(format!("{label}: {e}"));
        }
    }
    for t in &f.topic_permissions {
        let label = format!(
            "topic permissions of user '{}' on exchange '{}' in vhost '{}'",
            t.user, t.exchange, t.vhost
        );
        let key = (t.vhost.clone(), t.user.clone(), t.exchange.clone());
        if let Err(e) = access::TopicPermission::new(&t.write, &t.read) {
            errors.push(format!("{label}: {e}"));
        } else if state.topic_permissions.contains_key(&key) {
            report.skipped.push(label);
        } else if let Err(e) = access::set_topic_permissions(
            &mut scratch,
            &mut ops,
            &t.user,
            &t.vhost,
            &t.exchange,
            &t.write,
            &t.read,
        ) {
            errors.push(format!("{label}: {e}"));
        }
    }

    for (p, operator) in &f.policies {
        let what = if *operator {
            "operator policy"
        } else {
            "policy"
        };
        let label = format!("{what} '{}' in vhost '{}'", p.name, p.vhost);
        let map = if *operator {
            &state.operator_policies
        } else {
            &state.policies
        };
        if map.contains_key(&(p.vhost.clone(), p.name.clone())) {
            report.skipped.push(label);
        } else if !has_vhost(&p.vhost, &label, &mut errors) {
        } else if let Err(e) = access::set_policy(&mut scratch, &mut ops, p.clone(), *operator) {
            errors.push(format!("{label}: {e}"));
        }
    }

    // Topology: check against the broker and the file.
    let exists_exchange = |vhost: &str, name: &str| {
        broker
            .vhost(vhost)
            .is_some_and(|v| v.exchange_kind(name).is_some())
    };
    let exists_queue = |vhost: &str, name: &str| {
        broker
            .vhost(vhost)
            .is_some_and(|v| v.queue(name, 0).is_ok())
    };
    let mut new_exchanges: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut new_queues: BTreeSet<(&str, &str)> = BTreeSet::new();
    for x in &f.exchanges {
        let label = format!("exchange '{}' in vhost '{}'", x.name, x.vhost);
        if !has_vhost(&x.vhost, &label, &mut errors) {
            continue;
        }
        if exchange::kind(&x.kind).is_none() {
            errors.push(format!("{label}: unknown exchange type '{}'", x.kind));
        } else if exists_exchange(&x.vhost, &x.name) {
            report.skipped.push(label);
        } else if x.name.is_empty() || x.name.starts_with("amq.") {
            errors.push(format!("{label}: the name is reserved"));
        } else if !new_exchanges.insert((&x.vhost, &x.name)) {
            errors.push(format!("{label}: listed twice"));
        }
    }
    for q in &f.queues {
        let label = format!("queue '{}' in vhost '{}'", q.name, q.vhost);
        if !has_vhost(&q.vhost, &label, &mut errors) {
            continue;
        }
        if let Err(e) = crate::queue::args::validate(&q.name, &q.vhost, &q.arguments) {
            errors.push(format!("{label}: {}", e.text));
        } else if exists_queue(&q.vhost, &q.name) {
            report.skipped.push(label);
        } else if q.name.is_empty() || q.name.starts_with("amq.") || q.name.len() > 255 {
            errors.push(format!("{label}: invalid queue name"));
        } else if !new_queues.insert((&q.vhost, &q.name)) {
            errors.push(format!("{label}: listed twice"));
        }
    }
    let mut new_bindings = Vec::new();
    for (i, b) in f.bindings.iter().enumerate() {
        let label = format!(
            "binding #{} from exchange '{}' to {} '{}' in vhost '{}'",
            i + 1,
            b.source,
            if b.to_queue { "queue" } else { "exchange" },
            b.destination,
            b.vhost
        );
        if !has_vhost(&b.vhost, &label, &mut errors) {
            continue;
        }
        let src_ok = exists_exchange(&b.vhost, &b.source)
            || new_exchanges.contains(&(b.vhost.as_str(), b.source.as_str()));
        let dst_ok = if b.to_queue {
            exists_queue(&b.vhost, &b.destination)
                || new_queues.contains(&(b.vhost.as_str(), b.destination.as_str()))
        } else {
            exists_exchange(&b.vhost, &b.destination)
                || new_exchanges.contains(&(b.vhost.as_str(), b.destination.as_str()))
        };
        if b.source.is_empty() {
            errors.push(format!("{label}: the default exchange cannot be bound"));
        } else if !src_ok {
            errors.push(format!("{label}: source exchange does not exist"));
        } else if !dst_ok {
            errors.push(format!("{label}: destination does not exist"));
        } else {
            new_bindings.push(b);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Apply: access first (one atomic batch), then topology.
    let created_access = ops.len();
    let file = &f;
    broker
        .access
        .change(|s, ops| {
            for u in &file.users {
                if !s.users.contains_key(&u.name) {
                    access::add_user(
                        s,
                        ops,
                        &u.name,
                        u.password_hash.clone(),
                        u.algorithm,
                        u.tags.clone(),
                    )?;
                    access::set_user_limits(s, ops, &u.name, u.limits)?;
                }
            }
            for v in &file.vhosts {
                if !s.vhosts.contains_key(&v.name) {
                    access::add_vhost(s, ops, &v.name, &v.description, v.tags.clone())?;
                    access::set_vhost_limits(s, ops, &v.name, v.limits)?;
                }
            }
            for p in &file.permissions {
                if !s
                    .permissions
                    .contains_key(&(p.vhost.clone(), p.user.clone()))
                {
                    access::set_permissions(
                        s,
                        ops,
                        &p.user,
                        &p.vhost,
                        &p.configure,
                        &p.write,
                        &p.read,
                    )?;
                }
            }
            for t in &file.topic_permissions {
                let key = (t.vhost.clone(), t.user.clone(), t.exchange.clone());
                if !s.topic_permissions.contains_key(&key) {
                    access::set_topic_permissions(
                        s,
                        ops,
                        &t.user,
                        &t.vhost,
                        &t.exchange,
                        &t.write,
                        &t.read,
                    )?;
                }
            }
            for (p, operator) in &file.policies {
                let key = (p.vhost.clone(), p.name.clone());
                let exists = if *operator {
                    s.operator_policies.contains_key(&key)
                } else {
                    s.policies.contains_key(&key)
                };
                if !exists {
                    access::set_policy(s, ops, p.clone(), *operator)?;
                }
            }
            Ok(())
        })
        .map_err(|e| vec![e])?;
    // Policies in force before the topology they match is declared.
    let policy_vhosts: BTreeSet<&str> = f.policies.iter().map(|(p, _)| p.vhost.as_str()).collect();
    for v in policy_vhosts {
        broker.apply_policies(v).await.map_err(|e| vec![e])?;
    }
    if created_access > 0 {
        report
            .created
            .push(format!("{created_access} users, vhosts and permissions"));
    }
    for v in &f.vhosts {
        broker.ensure_vhost(&v.name);
    }
    let fail = |label: String, e: crate::error::AmqpError| vec![format!("{label}: {}", e.text)];
    for x in f
        .exchanges
        .iter()
        .filter(|x| new_exchanges.contains(&(x.vhost.as_str(), x.name.as_str())))
    {
        let label = format!("exchange '{}' in vhost '{}'", x.name, x.vhost);
        let v = broker.ensure_vhost(&x.vhost);
        v.declare_exchange(ExchangeSpec {
            name: &x.name,
            kind: &x.kind,
            passive: false,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: &x.arguments,
        })
        .await
        .map_err(|e| fail(label.clone(), e))?;
        report.created.push(label);
    }
    for q in f
        .queues
        .iter()
        .filter(|q| new_queues.contains(&(q.vhost.as_str(), q.name.as_str())))
    {
        let label = format!("queue '{}' in vhost '{}'", q.name, q.vhost);
        let v = broker.ensure_vhost(&q.vhost);
        v.declare_queue(
            QueueSpec {
                name: &q.name,
                passive: false,
                durable: q.durable,
                exclusive: false,
                auto_delete: q.auto_delete,
                arguments: &q.arguments,
            },
            0,
        )
        .await
        .map_err(|e| fail(label.clone(), e))?;
        report.created.push(label);
    }
    for b in new_bindings {
        let label = format!(
            "binding from '{}' to '{}' in vhost '{}'",
            b.source, b.destination, b.vhost
        );
        let v = broker.ensure_vhost(&b.vhost);
        let dest = if b.to_queue {
            Dest::Queue(b.destination.as_str().into())
        } else {
            Dest::Exchange(b.destination.as_str().into())
        };
        v.set_binding(true, &b.source, dest, &b.routing_key, &b.arguments, 0)
            .await
            .map_err(|e| fail(label.clone(), e))?;
        report.created.push(label);
    }
    Ok(report)
}

// ------------------------------------------------------------ export

/// Everything stored, in RabbitMQ's format: users with their hashes,
/// vhosts, permissions, topic permissions, and the durable exchanges
/// (but the built-in ones), queues and bindings.
pub fn export(state: &access::State, defs: &Definitions) -> Value {
    let users: Vec<Value> = state
        .users
        .values()
        .map(|u| {
            json!({
                "name": u.name,
                "password_hash": u.password_hash,
                "hashing_algorithm": u.algorithm.name(),
                "tags": u.tags,
                "limits": u.limits.pairs().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect::<Map<String, Value>>(),
            })
        })
        .collect();
    let vhosts: Vec<Value> = state
        .vhosts
        .values()
        .map(|v| {
            json!({
                "name": v.name,
                "limits": v.limits.pairs().into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                "metadata": {"description": v.description, "tags": v.tags},
            })
        })
        .collect();
    let permissions: Vec<Value> = state
        .permissions
        .iter()
        .map(|((vhost, user), p)| {
            json!({
                "user": user, "vhost": vhost,
                "configure": p.configure.source, "write": p.write.source, "read": p.read.source,
            })
        })
        .collect();
    let topic_permissions: Vec<Value> = state
        .topic_permissions
        .iter()
        .map(|((vhost, user, exchange), t)| {
            json!({"user": user, "vhost": vhost, "exchange": exchange, "write": t.write, "read": t.read})
        })
        .collect();
    let table = |b: &bytes::Bytes| {
        crate::vhost::decode_table(b)
            .map(|t| table_json(&t))
            .unwrap_or_else(|_| json!({}))
    };
    let exchanges: Vec<Value> = defs
        .exchanges
        .iter()
        .filter(|x| !x.name.is_empty() && !x.name.starts_with("amq."))
        .map(|x| {
            json!({
                "name": x.name, "vhost": x.vhost, "type": x.kind, "durable": true,
                "auto_delete": x.auto_delete, "internal": x.internal,
                "arguments": table(&x.arguments),
            })
        })
        .collect();
    let queues: Vec<Value> = defs
        .queues
        .iter()
        .map(|q| {
            json!({
                "name": q.name, "vhost": q.vhost, "durable": true,
                "auto_delete": q.auto_delete, "arguments": table(&q.arguments),
            })
        })
        .collect();
    let bindings: Vec<Value> = defs
        .bindings
        .iter()
        .map(|b| {
            json!({
                "source": b.source, "vhost": b.vhost, "destination": b.destination,
                "destination_type": if b.to_queue { "queue" } else { "exchange" },
                "routing_key": b.routing_key, "arguments": table(&b.arguments),
            })
        })
        .collect();
    let mut parameters: Vec<Value> = state.vhosts.values().filter(|v| !v.limits.is_empty()).map(|v| json!({
        "vhost": v.name, "component": "vhost-limits", "name": "limits",
        "value": v.limits.pairs().into_iter().map(|(k, n)| (k.to_owned(), json!(n))).collect::<Map<String, Value>>(),
    })).collect();
    parameters.extend(state.operator_policies.values().map(|p| {
        json!({
            "vhost": p.vhost, "component": "operator_policy", "name": p.name,
            "value": {
                "pattern": p.pattern, "apply-to": p.apply_to.name(),
                "priority": p.priority, "definition": p.raw,
            },
        })
    }));
    let policies: Vec<Value> = state
        .policies
        .values()
        .map(|p| {
            json!({
                "vhost": p.vhost, "name": p.name, "pattern": p.pattern,
                "apply-to": p.apply_to.name(), "priority": p.priority, "definition": p.raw,
            })
        })
        .collect();
    json!({
        "rabbit_version": RABBIT_VERSION,
        "rabbitmq_version": RABBIT_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "users": users,
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": parameters,
        "global_parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    })
}

#[cfg(test)]
mod tests;
