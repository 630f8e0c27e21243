//! Shared exchanges, queues and bindings: how they sit in the metadata
//! group's map, and how a node makes its own topology match it.
//!
//! Keys are JSON arrays after `topo/`, so that no name needs escaping:
//! `topo/["vhost","x","name"]` an exchange, `topo/["vhost","q","name"]` a
//! queue, and `topo/["vhost","b",DEST_TYPE,DEST,SOURCE,KEY,ARGS]` a binding
//! (keyed by its destination first, so that deleting a queue or exchange
//! deletes every binding to it with one prefix delete). Each exchange and
//! queue carries an incarnation number (`inc`), new at each declaration,
//! and each binding the incarnations of both ends: a binding is in force
//! only while both ends are the ones it was made to (a binding that raced
//! with a deletion never comes back with a later queue of the same name).
//!
//! A queue lives on the node that declared it (`node`); the others hold a
//! forwarding handle (`crate::queue::remote`). Exclusive queues are not
//! shared: they belong to one connection, on its node, and bindings to
//! them stay there too.

use crate::exchange::{Binding, Dest};
use crate::queue::QueueHandle;
use crate::vhost::{ExchangeView, Mirror, NewShared, VHost};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use warren_cluster::node_id;
use warren_cluster::MetaCommand;
use warren_protocol::types::FieldTable;

pub(crate) const PREFIX: &str = "topo/";

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

pub(crate) fn vhost_prefix(vhost: &str) -> String {
    format!("{PREFIX}[{},", js(vhost))
}
pub(crate) fn exchange_key(vhost: &str, name: &str) -> String {
    format!("{PREFIX}[{},\"x\",{}]", js(vhost), js(name))
}
pub(crate) fn queue_key(vhost: &str, name: &str) -> String {
    format!("{PREFIX}[{},\"q\",{}]", js(vhost), js(name))
}
/// The prefix of every binding to `dest` (`dest_type`: queue or exchange).
pub(crate) fn bindings_to(vhost: &str, dest_type: &str, dest: &str) -> String {
    format!(
        "{PREFIX}[{},\"b\",{},{},",
        js(vhost),
        js(dest_type),
        js(dest)
    )
}
pub(crate) fn binding_key(vhost: &str, b: &BDef) -> String {
    format!(
        "{}{},{},{}]",
        bindings_to(vhost, &b.destination_type, &b.destination),
        js(&b.source),
        js(&b.routing_key),
        js(&b.arguments)
    )
}

/// The vhost a key of this module belongs to.
pub(crate) fn vhost_of(key: &str) -> Option<String> {
    let parts: Vec<String> = serde_json::from_str(key.strip_prefix(PREFIX)?).ok()?;
    parts.into_iter().next()
}

/// A field table as the map keeps it (its AMQP encoding, base64: exact).
pub(crate) fn table_text(t: &FieldTable) -> String {
    B64.encode(crate::vhost::encode_table(t))
}
pub(crate) fn table_of(s: &str) -> Result<FieldTable, String> {
    let b = B64
        .decode(s)
        .map_err(|e| format!("arguments not base64: {e}"))?;
    crate::vhost::decode_table(&b)
}

/// Put `value` under `key` only if the key is absent (a first writer wins).
pub(crate) fn put_if_absent(key: String, value: Value) -> MetaCommand {
    MetaCommand::IfAbsent {
        key: key.clone(),
        then: Box::new(MetaCommand::Put { key, value }),
    }
}

/// A new incarnation number.
pub(crate) fn new_inc() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().max(1)
}

/// An exchange as the map holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct XDef {
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: String,
    pub inc: u64,
}

/// A queue as the map holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct QDef {
    pub node: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: String,
    pub inc: u64,
    /// A quorum queue: its Raft group and first members (`node` is the
    /// node that declared it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<QuorumDef>,
}

/// A quorum queue's group, as the map holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct QuorumDef {
    pub group: u64,
    /// Node names; the first makes the group.
    pub members: Vec<String>,
}

/// A binding as the map holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct BDef {
    pub source: String,
    pub source_inc: u64,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub destination: String,
    pub dest_inc: u64,
    pub routing_key: String,
    pub arguments: String,
}

impl BDef {
    pub(crate) fn binding(&self) -> Result<Binding, String> {
        let dest = match self.destination_type.as_str() {
            "queue" => Dest::Queue(self.destination.as_str().into()),
            _ => Dest::Exchange(self.destination.as_str().into()),
        };
        Ok(Binding {
            dest,
            key: self.routing_key.clone(),
            args: table_of(&self.arguments)?,
        })
    }
}

pub(crate) fn builtin(exchange: &str) -> bool {
    exchange.is_empty() || exchange.starts_with("amq.")
}

pub(crate) fn dest_parts(d: &Dest) -> (&'static str, &str) {
    match d {
        Dest::Queue(n) => ("queue", n),
        Dest::Exchange(n) => ("exchange", n),
    }
}

/// What the map says one vhost holds.
#[derive(Default, Debug)]
pub(crate) struct VhostDefs {
    pub exchanges: BTreeMap<String, XDef>,
    pub queues: BTreeMap<String, QDef>,
    /// Every binding entry with its key, in force or not.
    pub bindings: Vec<(String, BDef)>,
}

impl VhostDefs {
    /// Read from the entries of one vhost (see [`vhost_prefix`]).
    pub(crate) fn of(map: &BTreeMap<String, Value>) -> VhostDefs {
        let mut d = VhostDefs::default();
        for (k, v) in map {
            let Some(rest) = k.strip_prefix(PREFIX) else {
                continue;
            };
            let Ok(parts) = serde_json::from_str::<Vec<String>>(rest) else {
                continue;
            };
            match parts.get(1).map(String::as_str) {
                Some("x") if parts.len() == 3 => {
                    if let Ok(x) = serde_json::from_value(v.clone()) {
                        d.exchanges.insert(parts[2].clone(), x);
                    }
                }
                Some("q") if parts.len() == 3 => {
                    if let Ok(q) = serde_json::from_value(v.clone()) {
                        d.queues.insert(parts[2].clone(), q);
                    }
                }
                Some("b") => {
                    if let Ok(b) = serde_json::from_value(v.clone()) {
                        d.bindings.push((k.clone(), b));
                    }
                }
                _ => {}
            }
        }
        d
    }

    /// The incarnation of exchange or queue `name` (0: built in), if the
    /// map has it.
    pub(crate) fn inc_of(&self, dest_type: &str, name: &str) -> Option<u64> {
        match dest_type {
            "queue" => self.queues.get(name).map(|q| q.inc),
            _ if builtin(name) => Some(0),
            _ => self.exchanges.get(name).map(|x| x.inc),
        }
    }

    /// Whether a binding is in force: both its ends are the ones it was
    /// made to.
    pub(crate) fn live(&self, b: &BDef) -> bool {
        self.inc_of("exchange", &b.source) == Some(b.source_inc)
            && self.inc_of(&b.destination_type, &b.destination) == Some(b.dest_inc)
    }

    /// The map change that removes exchange or queue `name` (`kind`:
    /// `exchange` or `queue`) as this map has it, with every binding to
    /// it and what the removal empties ([`VhostDefs::cascade`]); applied
    /// only if it is still that incarnation. None: the map has no such.
    pub(crate) fn removal(&self, vhost: &str, kind: &str, name: &str) -> Option<MetaCommand> {
        let (key, def) = match kind {
            "queue" => (
                queue_key(vhost, name),
                serde_json::to_value(self.queues.get(name)?),
            ),
            _ => (
                exchange_key(vhost, name),
                serde_json::to_value(self.exchanges.get(name)?),
            ),
        };
        let mut cmds = vec![MetaCommand::Delete { key: key.clone() }];
        cmds.extend(self.cascade(
            vhost,
            BTreeSet::new(),
            vec![(kind.to_owned(), name.to_owned())],
        ));
        cmds.push(MetaCommand::DeletePrefix {
            prefix: bindings_to(vhost, kind, name),
        });
        Some(MetaCommand::IfEquals {
            key,
            value: def.unwrap_or_default(),
            then: Box::new(MetaCommand::Batch(cmds)),
        })
    }

    /// What goes with removing the binding entries `removed` and the ends
    /// `gone` (type, name): every binding to or from a gone end, and every
    /// auto-delete exchange left without bindings, with what goes with it.
    /// Returns the deletes, the vhost being `vhost`.
    pub(crate) fn cascade(
        &self,
        vhost: &str,
        mut removed: BTreeSet<String>,
        mut gone: Vec<(String, String)>,
    ) -> Vec<MetaCommand> {
        let mut cmds = Vec::new();
        let mut gone_x: BTreeSet<String> = BTreeSet::new();
        loop {
            for (dt, name) in gone.drain(..) {
                for (k, b) in &self.bindings {
                    let from = dt == "exchange" && b.source == name;
                    let to = b.destination_type == dt && b.destination == name;
                    if from || to {
                        removed.insert(k.clone());
                    }
                }
            }
            for (name, x) in &self.exchanges {
                if !x.auto_delete || gone_x.contains(name) {
                    continue;
                }
                let mine = || {
                    self.bindings
                        .iter()
                        .filter(|(_, b)| b.source == *name && self.live(b))
                };
                let lost = mine().any(|(k, _)| removed.contains(k));
                let left = mine().any(|(k, _)| !removed.contains(k));
                if lost && !left {
                    gone_x.insert(name.clone());
                    gone.push(("exchange".into(), name.clone()));
                    cmds.push(MetaCommand::Delete {
                        key: exchange_key(vhost, name),
                    });
                }
            }
            if gone.is_empty() {
                break;
            }
        }
        cmds.extend(removed.into_iter().map(|key| MetaCommand::Delete { key }));
        cmds
    }
}

/// The map entry of a local exchange.
pub(crate) fn xdef_of(x: &ExchangeView, inc: u64) -> XDef {
    XDef {
        kind: x.kind.to_owned(),
        durable: x.durable,
        auto_delete: x.auto_delete,
        internal: x.internal,
        arguments: table_text(&x.arguments),
        inc,
    }
}

/// The map entry of a local queue, homed on `node`.
pub(crate) fn qdef_of(q: &QueueHandle, node: &str, inc: u64, members: &[String]) -> QDef {
    QDef {
        node: node.to_owned(),
        durable: q.info.durable,
        auto_delete: q.info.auto_delete,
        arguments: table_text(&q.info.arguments),
        inc,
        quorum: q.info.quorum.map(|group| QuorumDef {
            group,
            members: members.to_vec(),
        }),
    }
}

/// A queue this node holds only for one of its connections (not shared).
pub(crate) fn local_only(q: &QueueHandle) -> bool {
    q.info.exclusive_owner.is_some() && q.home().is_none()
}

/// Whether a binding is one the map shares (not to an exclusive queue of
/// this node, which stays here with its queue).
pub(crate) fn shares_binding(v: &VHost, b: &Binding) -> bool {
    match &b.dest {
        Dest::Queue(n) => !v.find_queue(n).is_some_and(|q| local_only(&q)),
        Dest::Exchange(_) => true,
    }
}

/// A binding's identity, for comparing local and shared ones.
type BindingId = (String, String, String, String, String);

fn id_of(source: &str, b: &Binding) -> BindingId {
    let (dt, d) = dest_parts(&b.dest);
    (
        source.to_owned(),
        dt.to_owned(),
        d.to_owned(),
        b.key.clone(),
        table_text(&b.args),
    )
}

/// What a node remembers between mirrors: the incarnation of each shared
/// object it holds, and which vhosts it mirrored since it started.
#[derive(Default)]
pub(crate) struct MirrorState {
    incs: HashMap<String, u64>,
    seen: HashSet<String>,
}

/// The map entries this node's topology adds when it first follows a
/// cluster: its exchanges, its shared queues (homed here) and the
/// bindings between them, each put only if the map lacks it (a binding
/// only if both its ends are the ones this node put).
pub(crate) fn adoption(v: &VHost, me: &str) -> Vec<MetaCommand> {
    let vh = &v.name;
    let mut cmds = Vec::new();
    // (type, name) -> (key, entry, inc) of what this node offers.
    let mut ends: HashMap<(String, String), (String, Value, u64)> = HashMap::new();
    for x in v.exchanges().iter().filter(|x| !builtin(&x.name)) {
        let inc = new_inc();
        let (key, def) = (
            exchange_key(vh, &x.name),
            serde_json::to_value(xdef_of(x, inc)).unwrap_or_default(),
        );
        cmds.push(put_if_absent(key.clone(), def.clone()));
        ends.insert(("exchange".into(), x.name.clone()), (key, def, inc));
    }
    for q in v
        .queues()
        .iter()
        .filter(|q| !local_only(q) && q.home().is_none() && q.info.quorum.is_none())
    {
        let inc = new_inc();
        let (key, def) = (
            queue_key(vh, q.name()),
            serde_json::to_value(qdef_of(q, me, inc, &[])).unwrap_or_default(),
        );
        cmds.push(put_if_absent(key.clone(), def.clone()));
        ends.insert(("queue".into(), q.name().to_owned()), (key, def, inc));
    }
    for x in v.exchanges() {
        for b in x.bindings.iter().filter(|b| shares_binding(v, b)) {
            let (dt, d) = dest_parts(&b.dest);
            let src = ends.get(&("exchange".to_owned(), x.name.clone()));
            let Some(dst) = ends.get(&(dt.to_owned(), d.to_owned())) else {
                continue;
            };
            let source_inc = match src {
                Some(s) => s.2,
                None if builtin(&x.name) => 0,
                None => continue,
            };
            let def = BDef {
                source: x.name.clone(),
                source_inc,
                destination_type: dt.into(),
                destination: d.into(),
                dest_inc: dst.2,
                routing_key: b.key.clone(),
                arguments: table_text(&b.args),
            };
            let mut cmd = put_if_absent(
                binding_key(vh, &def),
                serde_json::to_value(&def).unwrap_or_default(),
            );
            for (key, value, _) in [Some(dst), src].into_iter().flatten() {
                cmd = MetaCommand::IfEquals {
                    key: key.clone(),
                    value: value.clone(),
                    then: Box::new(cmd),
                };
            }
            cmds.push(cmd);
        }
    }
    cmds
}

/// What one mirror pass did that the caller must follow up: this node's
/// queues the map still has but that did not survive its restart
/// (transient ones), to delete from the map.
#[derive(Default)]
pub(crate) struct Reconciled {
    pub lost_queues: Vec<String>,
}

/// Make vhost `v`'s exchanges, queues and bindings match `map` (its
/// entries). `me`: this node's name; `link`: how forwarding handles reach
/// other nodes.
pub(crate) async fn reconcile(
    v: &Arc<VHost>,
    map: &BTreeMap<String, Value>,
    me: &str,
    link: &Arc<dyn crate::queue::remote::Link>,
    state: &mut MirrorState,
) -> Result<Reconciled, String> {
    let vh = v.name.clone();
    let d = VhostDefs::of(map);
    let first = state.seen.insert(vh.clone());
    let mut out = Reconciled::default();
    let mut ops: Vec<Mirror> = Vec::new();
    let mut adds: Vec<Mirror> = Vec::new();

    // Exchanges.
    let local_x: HashMap<String, ExchangeView> = v
        .exchanges()
        .into_iter()
        .filter(|x| !builtin(&x.name))
        .map(|x| (x.name.clone(), x))
        .collect();
    for (name, x) in &local_x {
        let key = exchange_key(&vh, name);
        match d.exchanges.get(name) {
            None => {
                ops.push(Mirror::RemoveExchange(name.clone()));
                state.incs.remove(&key);
            }
            Some(def) => {
                let known = *state.incs.entry(key).or_insert(def.inc);
                if known != def.inc || xdef_of(x, def.inc) != *def {
                    ops.push(Mirror::RemoveExchange(name.clone()));
                    adds.push(Mirror::AddExchange(name.clone(), def.clone()));
                }
            }
        }
    }
    for (name, def) in &d.exchanges {
        if !local_x.contains_key(name) {
            adds.push(Mirror::AddExchange(name.clone(), def.clone()));
        }
        state.incs.insert(exchange_key(&vh, name), def.inc);
    }

    // Queues.
    let local_q: HashMap<String, QueueHandle> = v
        .queues()
        .into_iter()
        .map(|q| (q.name().to_owned(), q))
        .collect();
    let mut removed: Vec<QueueHandle> = Vec::new();
    for (name, q) in &local_q {
        if local_only(q) {
            if d.queues.contains_key(name) {
                tracing::error!(vhost = %vh, queue = %name, "the cluster has a queue by the name of an exclusive queue of this node: it is not reachable through this node until that one goes");
            }
            continue;
        }
        let key = queue_key(&vh, name);
        match d.queues.get(name) {
            None => {
                removed.push(q.clone());
                state.incs.remove(&key);
            }
            Some(def) => {
                let known = *state.incs.entry(key).or_insert(def.inc);
                if let Some(qd) = &def.quorum {
                    // A quorum queue's front is the same on every node.
                    if known == def.inc && q.info.quorum == Some(qd.group) {
                        // (Its members may have changed.)
                        let members = crate::queue::quorum::Control::Members(qd.members.clone());
                        crate::queue::quorum::control(node_id(me), qd.group, members);
                        continue;
                    }
                    removed.push(q.clone());
                    adds.push(new_queue(name, def, me, link)?);
                    continue;
                }
                let home_here = def.node == me;
                let same = known == def.inc
                    && home_here == q.home().is_none()
                    && q.home().is_none_or(|h| h == def.node)
                    && qdef_of(q, &def.node, def.inc, &[]) == *def;
                if same {
                    continue;
                }
                if !home_here && q.home().is_none() {
                    // Both this node and the cluster have it: this node's
                    // messages are never dropped for it.
                    tracing::error!(vhost = %vh, queue = %name, home = %def.node, "this node and the cluster both have this queue: this node keeps its own (with its messages); delete one of them");
                    continue;
                }
                removed.push(q.clone());
                adds.push(new_queue(name, def, me, link)?);
            }
        }
    }
    for (name, def) in &d.queues {
        state.incs.insert(queue_key(&vh, name), def.inc);
        if local_q.contains_key(name) {
            continue;
        }
        if def.node == me && first && !def.durable && def.quorum.is_none() {
            out.lost_queues.push(name.clone());
            continue;
        }
        adds.push(new_queue(name, def, me, link)?);
    }
    // A queue of this node goes with its messages (its actor deletes
    // them); a forwarding handle just goes.
    for q in removed {
        if let Some(group) = q.info.quorum {
            // Its log goes with the group, on every member.
            crate::queue::quorum::deleted(node_id(me), group);
        } else if q.home().is_none() {
            let _ = q
                .ask(|reply| crate::queue::QueueCmd::Delete {
                    if_unused: false,
                    if_empty: false,
                    reply,
                })
                .await;
        }
        ops.push(Mirror::RemoveQueue(q.name().to_owned(), q.id()));
    }
    ops.extend(adds);
    if !ops.is_empty() {
        v.mirror(ops).await.map_err(|e| e.text)?;
    }

    // Bindings, against the topology as it is now.
    let want: HashMap<BindingId, Binding> = d
        .bindings
        .iter()
        .filter(|(_, b)| d.live(b))
        .filter_map(|(_, b)| {
            let binding = b.binding().ok()?;
            Some((id_of(&b.source, &binding), binding))
        })
        .collect();
    let mut have: HashSet<BindingId> = HashSet::new();
    let mut ops = Vec::new();
    for x in v.exchanges() {
        for b in x.bindings.iter().filter(|b| shares_binding(v, b)) {
            let id = id_of(&x.name, b);
            if !want.contains_key(&id) {
                ops.push(Mirror::Unbind(x.name.clone(), b.clone()));
            }
            have.insert(id);
        }
    }
    for (id, b) in want {
        if !have.contains(&id) {
            ops.push(Mirror::Bind(id.0.clone(), b));
        }
    }
    if !ops.is_empty() {
        v.mirror(ops).await.map_err(|e| e.text)?;
    }
    Ok(out)
}

fn new_queue(
    name: &str,
    def: &QDef,
    me: &str,
    link: &Arc<dyn crate::queue::remote::Link>,
) -> Result<Mirror, String> {
    Ok(Mirror::AddQueue(NewShared {
        name: name.to_owned(),
        durable: def.durable,
        auto_delete: def.auto_delete,
        arguments: table_of(&def.arguments)?,
        home: (def.node != me && def.quorum.is_none())
            .then(|| (Arc::from(def.node.as_str()), link.clone())),
        quorum: def
            .quorum
            .as_ref()
            .map(|q| (q.group, q.members.clone(), link.clone())),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn x(inc: u64, auto_delete: bool) -> Value {
        json!({"type": "topic", "durable": true, "auto_delete": auto_delete, "internal": false, "arguments": "", "inc": inc})
    }
    fn q(inc: u64) -> Value {
        json!({"node": "n1", "durable": true, "auto_delete": false, "arguments": "", "inc": inc})
    }
    fn b(source: &str, si: u64, dt: &str, dest: &str, di: u64) -> (String, Value) {
        let def = BDef {
            source: source.into(),
            source_inc: si,
            destination_type: dt.into(),
            destination: dest.into(),
            dest_inc: di,
            routing_key: "k".into(),
            arguments: String::new(),
        };
        (binding_key("/", &def), serde_json::to_value(def).unwrap())
    }

    #[test]
    fn keys_need_no_escaping_and_name_their_vhost() {
        let k = queue_key("a\"b,c", "q]\"x");
        assert_eq!(vhost_of(&k).as_deref(), Some("a\"b,c"));
        assert!(k.starts_with(&vhost_prefix("a\"b,c")));
        assert!(!k.starts_with(&vhost_prefix("a")));
        let (bk, _) = b("src", 1, "queue", "q", 2);
        assert!(bk.starts_with(&bindings_to("/", "queue", "q")));
        assert!(!bk.starts_with(&bindings_to("/", "queue", "q2")));
        assert_eq!(vhost_of(&bk).as_deref(), Some("/"));
    }

    #[test]
    fn a_binding_holds_only_while_its_ends_are_the_ones_it_was_made_to() {
        let mut map = BTreeMap::from([
            (exchange_key("/", "x"), x(1, false)),
            (queue_key("/", "q"), q(7)),
        ]);
        let (k1, v1) = b("x", 1, "queue", "q", 7);
        let (k3, v3) = b("amq.topic", 0, "queue", "q", 7);
        map.extend([(k1, v1), (k3, v3)]);
        let d = VhostDefs::of(&map);
        assert!(d.bindings.iter().all(|(_, b)| d.live(b)));
        // Made to an older q (one entry per binding: the same key).
        let (k2, v2) = b("x", 1, "queue", "q", 6);
        map.insert(k2, v2);
        let d = VhostDefs::of(&map);
        let live: Vec<bool> = d.bindings.iter().map(|(_, b)| d.live(b)).collect();
        assert_eq!(live.iter().filter(|l| **l).count(), 1);
        assert_eq!(d.inc_of("exchange", "amq.topic"), Some(0));
        assert_eq!(d.inc_of("queue", "nope"), None);
    }

    #[test]
    fn removing_the_last_binding_of_an_auto_delete_exchange_removes_it_and_what_it_fed() {
        let (k1, v1) = b("ad", 3, "queue", "q", 7);
        let (k2, v2) = b("x", 1, "exchange", "ad", 3);
        let (k3, v3) = b("x", 1, "queue", "q", 7);
        let map = BTreeMap::from([
            (exchange_key("/", "x"), x(1, true)),
            (exchange_key("/", "ad"), x(3, true)),
            (queue_key("/", "q"), q(7)),
            (k1.clone(), v1),
            (k2.clone(), v2),
            (k3.clone(), v3),
        ]);
        let d = VhostDefs::of(&map);
        // Deleting q: ad loses its only binding and goes, and with it the
        // binding x -> ad; x then has none left and goes too.
        let cmds = d.cascade("/", BTreeSet::new(), vec![("queue".into(), "q".into())]);
        let deleted: BTreeSet<String> = cmds
            .into_iter()
            .map(|c| match c {
                MetaCommand::Delete { key } => key,
                other => panic!("{other:?}"),
            })
            .collect();
        let want: BTreeSet<String> = [exchange_key("/", "ad"), exchange_key("/", "x"), k1, k2, k3]
            .into_iter()
            .collect();
        assert_eq!(deleted, want);
    }
}
