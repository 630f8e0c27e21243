//! Reading a definitions file: every item checked and decoded, every
//! problem collected and named (nothing is applied here; see `import`).

use super::*;

#[derive(Debug, Default)]
pub(super) struct File {
    pub(super) users: Vec<UserDef>,
    pub(super) vhosts: Vec<VhostDef>,
    pub(super) permissions: Vec<PermDef>,
    pub(super) topic_permissions: Vec<TopicDef>,
    /// Policies, then operator policies (`true`), validated.
    pub(super) policies: Vec<(crate::policy::Policy, bool)>,
    pub(super) exchanges: Vec<ExchangeItem>,
    pub(super) queues: Vec<QueueItem>,
    pub(super) bindings: Vec<BindingItem>,
}

#[derive(Debug)]
pub(super) struct UserDef {
    pub(super) name: String,
    pub(super) password_hash: String,
    pub(super) algorithm: Algorithm,
    pub(super) tags: Vec<String>,
    pub(super) limits: Limits,
}

#[derive(Debug)]
pub(super) struct VhostDef {
    pub(super) name: String,
    pub(super) description: String,
    pub(super) tags: Vec<String>,
    pub(super) limits: Limits,
}

#[derive(Debug)]
pub(super) struct PermDef {
    pub(super) user: String,
    pub(super) vhost: String,
    pub(super) configure: String,
    pub(super) write: String,
    pub(super) read: String,
}

#[derive(Debug)]
pub(super) struct TopicDef {
    pub(super) user: String,
    pub(super) vhost: String,
    pub(super) exchange: String,
    pub(super) write: String,
    pub(super) read: String,
}

#[derive(Debug)]
pub(super) struct ExchangeItem {
    pub(super) vhost: String,
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    pub(super) internal: bool,
    pub(super) arguments: FieldTable,
}

#[derive(Debug)]
pub(super) struct QueueItem {
    pub(super) vhost: String,
    pub(super) name: String,
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    pub(super) arguments: FieldTable,
}

#[derive(Debug)]
pub(super) struct BindingItem {
    pub(super) vhost: String,
    pub(super) source: String,
    pub(super) destination: String,
    pub(super) to_queue: bool,
    pub(super) routing_key: String,
    pub(super) arguments: FieldTable,
}

/// Top-level keys of RabbitMQ's format.
pub(super) const KEYS: &[&str] = &[
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
pub(super) struct Item<'a> {
    pub(super) label: String,
    pub(super) map: &'a Map<String, Value>,
}

impl Item<'_> {
    pub(super) fn str(&self, key: &str) -> Result<String, String> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "{}: '{key}' must be a string, not {other}",
                self.label
            )),
            None => Err(format!("{}: '{key}' is missing", self.label)),
        }
    }
    pub(super) fn str_or(&self, key: &str, default: &str) -> Result<String, String> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default.to_owned()),
            _ => self.str(key),
        }
    }
    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!(
                "{}: '{key}' must be true or false, not {other}",
                self.label
            )),
        }
    }
    pub(super) fn table(&self, key: &str) -> Result<FieldTable, String> {
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
    pub(super) fn limits(&self, allowed: &[&str]) -> Result<Limits, String> {
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
    pub(super) fn policy(
        &self,
        body: &Item<'_>,
        operator: bool,
    ) -> Result<crate::policy::Policy, String> {
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

    pub(super) fn tags(&self) -> Result<Vec<String>, String> {
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

pub(super) fn items<'a>(
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

pub(super) fn named(kind: &'static str) -> impl Fn(usize, &Map<String, Value>) -> String {
    move |i, m| match (m.get("name"), m.get("vhost")) {
        (Some(Value::String(n)), Some(Value::String(v))) => {
            format!("{kind} '{n}' in vhost '{v}'")
        }
        (Some(Value::String(n)), _) => format!("{kind} '{n}'"),
        _ => format!("{kind} #{}", i + 1),
    }
}

/// Parse a definitions file; every problem is listed.
pub(super) fn parse(json: &[u8]) -> Result<File, Vec<String>> {
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
            let kind = match it.map.get("type").and_then(Value::as_str) {
                None | Some("classic") => None,
                Some(t @ ("quorum" | "stream")) => Some(t),
                Some(t) => {
                    return Err(format!(
                        "{}: queue type '{t}' is not supported by Warren",
                        it.label
                    ))
                }
            };
            let mut arguments = it.table("arguments")?;
            match arguments.inner().get("x-queue-type") {
                Some(AMQPValue::LongString(t))
                    if kind.is_some_and(|k| k.as_bytes() != t.as_bytes()) =>
                {
                    return Err(format!(
                        "{}: type '{}' and argument x-queue-type '{}' disagree",
                        it.label,
                        kind.unwrap_or("classic"),
                        String::from_utf8_lossy(t.as_bytes())
                    ));
                }
                None => {
                    if let Some(k) = kind {
                        arguments.insert("x-queue-type".into(), AMQPValue::LongString(k.into()));
                    }
                }
                _ => {}
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

pub(super) fn push<T>(list: &mut Vec<T>, r: Result<T, String>, errors: &mut Vec<String>) {
    match r {
        Ok(v) => list.push(v),
        Err(e) => errors.push(e),
    }
}
