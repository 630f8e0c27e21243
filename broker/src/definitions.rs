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
use std::sync::Arc;
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

mod parse;
use parse::*;

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
/// On a clustered node every change goes through the cluster, as if made
/// one by one through the API.
pub async fn import(broker: &Arc<Broker>, json: &[u8]) -> Result<Report, Vec<String>> {
    let f = Arc::new(parse(json)?);
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
            .is_some_and(|v| v.find_queue(name).is_some())
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
        if let Err(e) =
            crate::queue::args::validate(&q.name, &q.vhost, &q.arguments).and_then(|()| {
                crate::queue::args::validate_type(
                    &q.name,
                    &q.vhost,
                    q.durable,
                    false,
                    q.auto_delete,
                    &q.arguments,
                )
            })
        {
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
    let file = f.clone();
    broker
        .change_access(move |s, ops| {
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
        .await
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
            let arguments = table(&q.arguments);
            // RabbitMQ exports the type beside the arguments.
            let kind = arguments
                .get("x-queue-type")
                .and_then(Value::as_str)
                .unwrap_or("classic")
                .to_owned();
            json!({
                "name": q.name, "vhost": q.vhost, "durable": true,
                "auto_delete": q.auto_delete, "arguments": arguments, "type": kind,
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
