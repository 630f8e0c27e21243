//! Rows of the API's JSON as an aligned table (or JSON), with the columns
//! asked for.

use serde_json::{Map, Value};

/// A cell: strings bare, lists joined with commas, objects as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Columns every listing knows, whether or not it has rows.
const KNOWN: &[&str] = &[
    "name",
    "vhost",
    "messages",
    "messages_ready",
    "messages_unacknowledged",
    "message_bytes_ready",
    "consumers",
    "durable",
    "auto_delete",
    "exclusive",
    "arguments",
    "policy",
    "operator_policy",
    "effective_policy_definition",
    "type",
    "internal",
    "state",
    "node",
    "source_name",
    "source_kind",
    "destination_name",
    "destination_kind",
    "source",
    "destination",
    "destination_type",
    "routing_key",
    "properties_key",
    "user",
    "peer_host",
    "peer_port",
    "host",
    "port",
    "channels",
    "ssl",
    "connected_at",
    "protocol",
    "timeout",
    "frame_max",
    "channel_max",
    "client_properties",
    "tags",
    "description",
    "configure",
    "write",
    "read",
    "pattern",
    "apply-to",
    "definition",
    "priority",
    "auth_mechanism",
    "number",
    "consumer_count",
    "prefetch_count",
    "global_prefetch_count",
    "confirm",
    "transactional",
    "queue_name",
    "channel_name",
    "consumer_tag",
    "ack_required",
    "active",
];

/// An unknown column is an error naming it.
pub fn check(columns: &[String], rows: &Value) -> Result<(), String> {
    let first = rows
        .as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_object);
    for c in columns {
        let here = first.is_some_and(|f| f.contains_key(c));
        if !here && !KNOWN.contains(&c.as_str()) {
            return Err(format!("unknown column '{c}'"));
        }
    }
    Ok(())
}

/// Print `rows` with `columns` (a column a row lacks is empty).
pub fn print(rows: &[Value], columns: &[String], json: bool) -> Result<(), String> {
    if json {
        let out: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut m = Map::new();
                for c in columns {
                    m.insert(c.clone(), r.get(c).cloned().unwrap_or(Value::Null));
                }
                Value::Object(m)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| cell(r.get(c).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<&str>| {
        let parts: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(columns.iter().map(String::as_str).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
    Ok(())
}
