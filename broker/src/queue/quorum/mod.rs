//! A quorum queue of a cluster (`x-queue-type: quorum` on a clustered
//! node): one Raft group per queue, over `x-quorum-initial-group-size` of
//! the nodes, whose log holds the queue's publishes, settlements and
//! delivery counts ([`machine`]).
//!
//! Every node holds the queue's *front*: the [`QueueHandle`] its vhost
//! routes to and its channels consume from. The front follows the group's
//! leader:
//! - on the leader it runs the queue actor (`super::actor::spawn_replica`),
//!   built from the replicated messages when this node took over. A
//!   publish is handed to it once its log entry is committed by a majority
//!   (and applied here), and its confirm goes out then; what the actor
//!   removes or counts is written to the log after it;
//! - on another member it forwards to the leader's node
//!   (`super::remote::spawn_follower`), and on a node outside the group to
//!   a member's front.
//!
//! Consumers registered through a front are kept there and registered
//! again with the next leader when leadership moves; their unacked
//! messages come back from it marked redelivered (a new leader delivers
//! every message it took over as redelivered: the previous one may have
//! delivered any of them). While there is no leader (an election, or a
//! minority side of a partition) the front holds commands, and publishes
//! stay unconfirmed.

pub(crate) mod machine;

use super::actor::{spawn_replica, Adopted};
use super::args::QueueArgs;
use super::handle::{Consumer, OnAutoDelete, QueueCmd};
use super::remote::{self, Link, Publishes};
use super::{DeadLetterRouter, QueueHandle, QueueInfo, PUBLISH_PERMITS};
use crate::events::ConfirmTicket;
use crate::message::{Message, MessageRef};
use crate::persist::Persister;
use machine::{Command, QueueMachine};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use warren_cluster::{ClusterNode, ClusterStatus, Group, GroupWriteError, PendingWrite};
use warren_storage::MessageOp;

/// Publishes replicated in one log entry, at most.
const BATCH: usize = 512;
/// Log writes of one queue awaiting their commit at once.
const IN_FLIGHT: usize = 16;
/// Commands a front holds while it has no leader, before it stops taking
/// more (publishers then wait for mailbox slots).
const HOLD_LIMIT: usize = 8192;
/// How often a front checks that it follows the current leader.
const RECHECK: Duration = Duration::from_secs(1);

/// What a front needs from its node.
#[derive(Clone)]
pub struct Env {
    pub cluster: Arc<ClusterNode>,
    pub link: Arc<dyn Link>,
    pub persister: Option<Persister>,
    pub router: Weak<dyn DeadLetterRouter>,
    /// Makes what a leader's queue actor runs when it deletes itself
    /// (`x-expires`).
    pub on_auto_delete: Arc<dyn Fn() -> OnAutoDelete + Send + Sync>,
}

/// A front's link to the rest of the node: told when its queue is deleted,
/// and asked to change the group.
struct Ctl {
    deleted: AtomicBool,
    wake: Notify,
    control: mpsc::UnboundedSender<Control>,
}

/// What operators ask of a quorum queue's front.
pub enum Control {
    /// Add (`add`) or remove `node` as a member of the queue's group: done
    /// by the leader (the front forwards it there).
    Member {
        add: bool,
        node: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The group's members as the cluster's map now lists them.
    Members(Vec<String>),
    /// Stand for election (leaders are being rebalanced).
    Elect,
    /// The leader and members this node knows of (members only).
    Status(oneshot::Sender<Option<ClusterStatus>>),
}

/// Ask the front of quorum queue `group` on node `node` (this process).
/// False: no such front here.
pub fn control(node: u64, group: u64, c: Control) -> bool {
    fronts()
        .get(&(node, group))
        .is_some_and(|ctl| ctl.control.send(c).is_ok())
}

/// Every front of this process by (node id, group).
static FRONTS: LazyLock<Mutex<Fronts>> = LazyLock::new(Default::default);
type Fronts = HashMap<(u64, u64), Arc<Ctl>>;

fn fronts() -> std::sync::MutexGuard<'static, Fronts> {
    FRONTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cluster deleted the quorum queue of `group`: its front on node
/// `node` stops, and this node's member of the group goes with its log.
pub fn deleted(node: u64, group: u64) {
    if let Some(c) = fronts().get(&(node, group)) {
        c.deleted.store(true, Ordering::Release);
        c.wake.notify_one();
    }
}

/// Add or remove a member of quorum queue `group` through this node's
/// front (node id `node`).
pub async fn change_members(
    node: u64,
    group: u64,
    add: bool,
    member: String,
) -> Result<(), String> {
    let (reply, answer) = oneshot::channel();
    let c = Control::Member {
        add,
        node: member,
        reply,
    };
    if !control(node, group, c) {
        return Err("the queue is not on this node".into());
    }
    answer
        .await
        .unwrap_or_else(|_| Err("the queue went away".into()))
}

/// The group of quorum queue `group` as this node's front sees it (None
/// outside the group).
pub async fn status(node: u64, group: u64) -> Option<ClusterStatus> {
    let (reply, answer) = oneshot::channel();
    if !control(node, group, Control::Status(reply)) {
        return None;
    }
    answer.await.ok().flatten()
}

/// Where a front sends what it is told.
enum Target {
    /// No leader known: commands wait.
    None,
    /// This node was elected in `term` and is making sure it applied
    /// everything committed before (a no-op write) before it takes over.
    Taking(u64),
    /// This node leads (in `term`): the queue actor.
    Local(QueueHandle, u64),
    /// Another node leads, or (outside the group) a member's front.
    Remote {
        handle: QueueHandle,
        node: Arc<str>,
        term: u64,
        retired: Arc<AtomicBool>,
    },
}

/// A write awaiting its commit.
enum Kind {
    Publish(Publishes, u64),
    Ops,
    TakeOver(u64),
}

/// Start the front of quorum queue `info` (whose `quorum` is its group)
/// on this node; `members` are the group's first members (the first of
/// them makes the group).
pub fn spawn(info: QueueInfo, args: QueueArgs, members: Vec<String>, env: Env) -> QueueHandle {
    let permits = Arc::new(Semaphore::new(PUBLISH_PERMITS));
    let (tx, mailbox) = mpsc::unbounded_channel();
    let info = Arc::new(info);
    let group = info.quorum.unwrap_or_default();
    let (control, controls) = mpsc::unbounded_channel();
    let ctl = Arc::new(Ctl {
        deleted: AtomicBool::new(false),
        wake: Notify::new(),
        control,
    });
    fronts().insert((env.cluster.id(), group), ctl.clone());
    let (sink, ops) = mpsc::unbounded_channel();
    let (resend, resent) = mpsc::unbounded_channel();
    let front = Front {
        resends: Default::default(),
        resend,
        forwarders: 0,
        me: env.cluster.info().name.clone(),
        info: info.clone(),
        args,
        members,
        env,
        group_id: group,
        machine: Arc::new(QueueMachine::default()),
        group: None,
        target: Target::None,
        consumers: Vec::new(),
        held: VecDeque::new(),
        batch: Vec::new(),
        writes: VecDeque::new(),
        sink,
        permits: permits.clone(),
    };
    let span = tracing::debug_span!("quorum_queue", name = %info.name);
    tokio::spawn(tracing::Instrument::instrument(
        front.run(mailbox, ops, resent, controls, ctl),
        span,
    ));
    QueueHandle::new(info, permits, tx)
}

struct Front {
    me: String,
    info: Arc<QueueInfo>,
    args: QueueArgs,
    members: Vec<String>,
    env: Env,
    group_id: u64,
    machine: Arc<QueueMachine>,
    /// This node's member of the group (None outside it).
    group: Option<Group>,
    target: Target,
    /// The consumers registered through this front, to register again
    /// with the next leader.
    consumers: Vec<Consumer>,
    /// Commands waiting for a leader.
    held: VecDeque<QueueCmd>,
    /// Publishes a forwarder could not deliver to the leader's node (never
    /// sent), by the order they were sent in: they go before `held`.
    resends: std::collections::BTreeMap<u64, Publishes>,
    resend: remote::Resend,
    /// Forwarders made so far (their resends are numbered after the
    /// previous ones').
    forwarders: u64,
    /// Publishes gathered for the next log entry.
    batch: Publishes,
    /// Writes awaiting their commit, in log order.
    writes: VecDeque<(PendingWrite, Kind)>,
    /// Where the leader's queue actor sends its store writes.
    sink: mpsc::UnboundedSender<Vec<MessageOp>>,
    permits: Arc<Semaphore>,
}

/// A consumer registered again elsewhere: the same one, with nothing
/// unacked there yet.
fn copy_consumer(c: &Consumer) -> Consumer {
    Consumer {
        tag: c.tag.clone(),
        conn_id: c.conn_id,
        chan_key: c.chan_key,
        channel: c.channel,
        no_ack: c.no_ack,
        exclusive: c.exclusive,
        prefetch: c.prefetch,
        channel_credit: c.channel_credit.clone(),
        in_flight: c.in_flight.clone(),
        conn: c.conn.clone(),
        priority: c.priority,
        unacked: 0,
        order: 0,
        timeout: c.timeout,
        cancel_notify: c.cancel_notify,
        stream: None,
    }
}

/// Commands that read or change the messages: they wait for the publishes
/// before them to be committed.
fn after_publishes(c: &QueueCmd) -> bool {
    matches!(
        c,
        QueueCmd::Stats { .. }
            | QueueCmd::Info { .. }
            | QueueCmd::Purge { .. }
            | QueueCmd::Delete { .. }
            | QueueCmd::Get { .. }
            | QueueCmd::Consumers { .. }
    )
}

impl Front {
    async fn run(
        mut self,
        mut mailbox: mpsc::UnboundedReceiver<QueueCmd>,
        mut ops: mpsc::UnboundedReceiver<Vec<MessageOp>>,
        mut resent: mpsc::UnboundedReceiver<(u64, Publishes)>,
        mut controls: mpsc::UnboundedReceiver<Control>,
        ctl: Arc<Ctl>,
    ) {
        let mut watch = self.open_group().await;
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A command that waits for the writes before it.
        let mut barrier: Option<QueueCmd> = None;
        loop {
            if let Some(c) = barrier.take() {
                if self.writes.is_empty() || !matches!(self.target, Target::Local(..)) {
                    self.dispatch(c);
                } else {
                    barrier = Some(c);
                }
            }
            let reading =
                barrier.is_none() && self.writes.len() < IN_FLIGHT && self.held.len() < HOLD_LIMIT;
            tokio::select! {
                done = async { (&mut self.writes.front_mut().expect("a write").0).await }, if !self.writes.is_empty() => {
                    let (_, kind) = self.writes.pop_front().expect("a write");
                    self.written(done, kind).await;
                }
                o = ops.recv() => {
                    if let Some(o) = o {
                        self.replicate_ops(o).await;
                    }
                }
                c = controls.recv() => {
                    if let Some(c) = c {
                        if let Some(w) = self.control(c).await {
                            watch = w;
                        }
                    }
                }
                r = resent.recv() => {
                    if let Some((order, batch)) = r {
                        // Sent again once the leader changes, or at the next check.
                        self.resends.insert(order, batch);
                    }
                }
                st = async { watch.as_mut().expect("a watch").changed().await }, if watch.is_some() => {
                    match st {
                        Some(st) => self.follow(&st).await,
                        None => watch = None,
                    }
                }
                _ = recheck.tick() => {
                    if ctl.deleted.load(Ordering::Acquire) {
                        break;
                    }
                    let st = self.group.as_ref().map(Group::status);
                    match st {
                        Some(st) => self.follow(&st).await,
                        None => self.follow_from_outside(),
                    }
                    // What waited goes again (the leader may be back).
                    self.flush_held();
                    self.submit_batch().await;
                }
                _ = ctl.wake.notified() => {
                    if ctl.deleted.load(Ordering::Acquire) {
                        break;
                    }
                }
                c = mailbox.recv(), if reading => {
                    let Some(c) = c else { break };
                    let mut next = Some(c);
                    let mut taken = 0;
                    while let Some(c) = next.take() {
                        if after_publishes(&c) && matches!(self.target, Target::Local(..)) {
                            self.submit_batch().await;
                            barrier = Some(c);
                            break;
                        }
                        self.take(c).await;
                        taken += 1;
                        if taken < 256 && self.writes.len() < IN_FLIGHT {
                            next = mailbox.try_recv().ok();
                        }
                    }
                    self.submit_batch().await;
                }
            }
        }
        let deleted = ctl.deleted.load(Ordering::Acquire);
        self.stop(deleted).await;
        fronts().remove(&(self.env.cluster.id(), self.group_id));
    }

    /// Open this node's member of the group, if it is one; the first
    /// member makes the group. Returns a watch on it.
    async fn open_group(&mut self) -> Option<warren_cluster::GroupWatch> {
        if !self.members.contains(&self.me) {
            self.follow_from_outside();
            return None;
        }
        let g = match self
            .env
            .cluster
            .open_group(self.group_id, self.machine.clone())
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot open this node's member of a quorum queue");
                self.follow_from_outside();
                return None;
            }
        };
        if self.members.first() == Some(&self.me) {
            let known = self.env.cluster.status().members;
            let infos: Vec<_> = self
                .members
                .iter()
                .filter_map(|m| known.iter().find(|k| &k.name == m).cloned())
                .collect();
            if let Err(e) = g.initialize(&infos).await {
                tracing::error!(error = %e, "cannot make a quorum queue's group");
            }
        }
        let watch = g.watch();
        self.group = Some(g);
        Some(watch)
    }

    /// An operator's request. Returns a new watch when this node joined or
    /// left the group (None inside: left).
    async fn control(&mut self, c: Control) -> Option<Option<warren_cluster::GroupWatch>> {
        match c {
            Control::Status(reply) => {
                let _ = reply.send(self.group.as_ref().map(Group::status));
            }
            Control::Elect => {
                if let Some(g) = &self.group {
                    if let Err(e) = g.elect().await {
                        tracing::warn!(error = %e, "cannot stand for a quorum queue's leadership");
                    }
                }
            }
            Control::Members(members) => {
                let was = self.members.contains(&self.me);
                let is = members.contains(&self.me);
                self.members = members;
                if is && !was && self.group.is_none() {
                    self.retire();
                    return Some(self.open_group().await);
                }
                if was && !is {
                    if let Some(g) = self.group.take() {
                        let _ = g;
                        self.retire();
                        if let Err(e) = self.env.cluster.destroy_group(self.group_id).await {
                            tracing::warn!(error = %e, "cannot remove a quorum queue's log after leaving its group");
                        }
                        self.follow_from_outside();
                        return Some(None);
                    }
                }
            }
            Control::Member { add, node, reply } => self.change_member(add, node, reply),
        }
        None
    }

    /// Add or remove a member, on the leader (forwarded there from
    /// elsewhere). The leader lists the new member in the map first (so it
    /// opens its member of the group), then changes the group's
    /// membership (a new member is caught up before it votes); a member
    /// leaves the group first, then the map.
    fn change_member(
        &mut self,
        add: bool,
        node: String,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        let (vhost, name) = (self.info.vhost.clone(), self.info.name.to_string());
        match &self.target {
            Target::Local(..) => {
                let Some(group) = self.group.clone() else {
                    let _ = reply.send(Err("this node is not a member".into()));
                    return;
                };
                let cluster = self.env.cluster.clone();
                tokio::spawn(async move {
                    let r = change_member(&cluster, &group, &vhost, &name, add, &node).await;
                    let _ = reply.send(r);
                });
            }
            Target::Remote { node: to, .. } => {
                let (link, to) = (self.env.link.clone(), to.to_string());
                tokio::spawn(async move {
                    let req = serde_json::json!({"op": "quorum_member", "vhost": vhost,
                        "queue": name, "add": add, "node": node});
                    let r = match link.call(&to, req).await {
                        Ok(v) => match v.get("error") {
                            Some(e) => Err(e
                                .get("text")
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or("refused")
                                .to_owned()),
                            None => Ok(()),
                        },
                        Err(remote::LinkError::Down(why) | remote::LinkError::Failed(why)) => {
                            Err(format!("the queue's leader {to} could not do it: {why}"))
                        }
                    };
                    let _ = reply.send(r);
                });
            }
            Target::None | Target::Taking(_) => {
                let _ = reply.send(Err(format!(
                    "quorum queue '{name}' in vhost '{vhost}' has no leader now: try again"
                )));
            }
        }
    }

    /// Outside the group: forward to a member's front (it follows the
    /// leader), the first member the cluster still has.
    fn follow_from_outside(&mut self) {
        if let Target::Remote { .. } = self.target {
            return;
        }
        let known = self.env.cluster.status().members;
        let Some(m) = self
            .members
            .iter()
            .find(|m| known.iter().any(|k| &k.name == *m))
        else {
            return;
        };
        let node: Arc<str> = m.as_str().into();
        self.forward_to(node, 0);
    }

    /// Follow the group's state: take over when elected, forward to the
    /// leader, or hold commands while there is none.
    async fn follow(&mut self, st: &ClusterStatus) {
        match &st.leader {
            Some(l) if l.name == self.me => {
                let current = match self.target {
                    Target::Local(_, t) | Target::Taking(t) => Some(t),
                    _ => None,
                };
                if current == Some(st.term) {
                    return;
                }
                self.retire();
                self.target = Target::Taking(st.term);
                match self.submit(Command::Noop).await {
                    Ok(w) => self.writes.push_back((w, Kind::TakeOver(st.term))),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot take over a quorum queue yet");
                        self.target = Target::None;
                    }
                }
            }
            Some(l) => {
                if matches!(&self.target, Target::Remote { node, term, .. } if **node == *l.name && *term == st.term)
                {
                    return;
                }
                self.retire();
                self.forward_to(l.name.as_str().into(), st.term);
            }
            None => {
                if !matches!(self.target, Target::None) {
                    self.retire();
                }
            }
        }
    }

    /// Stop sending to the current target: a leader's actor stops (its
    /// messages stay in the log), a forwarding handle retires quietly.
    fn retire(&mut self) {
        match std::mem::replace(&mut self.target, Target::None) {
            Target::Remote { retired, .. } => retired.store(true, Ordering::Release),
            Target::Local(..) | Target::Taking(_) | Target::None => {}
        }
        // Not committed under this target: the publishers hear nack.
        for (_, t) in self.batch.drain(..) {
            if let Some(t) = t {
                t.nack();
                t.settle();
            }
        }
    }

    fn forward_to(&mut self, node: Arc<str>, term: u64) {
        let mut info = QueueInfo {
            name: self.info.name.clone(),
            id: self.info.id,
            vhost: self.info.vhost.clone(),
            durable: true,
            exclusive_owner: None,
            auto_delete: false,
            arguments: self.info.arguments.clone(),
            home: Some(node.clone()),
            quorum: self.info.quorum,
        };
        info.home = Some(node.clone());
        self.forwarders += 1;
        let (handle, retired) = remote::spawn_follower(
            Arc::new(info),
            self.env.link.clone(),
            self.resend.clone(),
            self.forwarders << 32,
        );
        self.target = Target::Remote {
            handle,
            node,
            term,
            retired,
        };
        self.reattach();
    }

    /// Register this front's consumers with the new target and hand it
    /// what waited.
    fn reattach(&mut self) {
        let handle = match &self.target {
            Target::Local(h, _) => h.clone(),
            Target::Remote { handle, .. } => handle.clone(),
            _ => return,
        };
        self.consumers.retain(|c| !c.conn.is_closed());
        for c in &self.consumers {
            let (reply, _) = tokio::sync::oneshot::channel();
            handle.tell(QueueCmd::Consume {
                consumer: Box::new(copy_consumer(c)),
                reply,
            });
        }
        self.flush_held();
    }

    /// Hand what waited to the target, if there is one: publishes given
    /// back first, in the order they were sent, then the commands held.
    fn flush_held(&mut self) {
        if matches!(self.target, Target::None | Target::Taking(_)) {
            return;
        }
        for (_, batch) in std::mem::take(&mut self.resends) {
            for (msg, confirm) in batch {
                self.dispatch_publish(msg, confirm);
            }
        }
        while let Some(c) = self.held.pop_front() {
            self.dispatch(c);
        }
    }

    /// A command from the mailbox.
    async fn take(&mut self, c: QueueCmd) {
        if let QueueCmd::Reconfigure(a) = &c {
            self.args = (**a).clone();
        }
        if !self.held.is_empty() || !self.resends.is_empty() {
            self.held.push_back(c);
            return;
        }
        if let (QueueCmd::Publish(_), Target::Local(..)) = (&c, &self.target) {
            let QueueCmd::Publish(p) = c else { return };
            if p.permit {
                self.permits.add_permits(1);
            }
            self.batch.push((p.msg, p.confirm));
            if self.batch.len() >= BATCH {
                self.submit_batch().await;
            }
            return;
        }
        self.dispatch(c);
    }

    /// Hand a command to the target, or hold it while there is none.
    fn dispatch(&mut self, c: QueueCmd) {
        if matches!(self.target, Target::None | Target::Taking(_)) {
            self.held.push_back(c);
            return;
        }
        // The consumers registered through this front, as the target has
        // them (kept here, when they reach it, to register them again with
        // the next one: one held meanwhile is registered when it goes, not
        // twice). Consumers of other nodes (conn_id 0) are registered again
        // by their own node's front.
        match &c {
            QueueCmd::Consume { consumer, .. } if consumer.conn_id != 0 => {
                self.consumers.push(copy_consumer(consumer))
            }
            QueueCmd::Cancel { chan_key, tag } => self
                .consumers
                .retain(|c| !(c.chan_key == *chan_key && c.tag == *tag)),
            QueueCmd::ChannelClosed { chan_key } => {
                self.consumers.retain(|c| c.chan_key != *chan_key)
            }
            _ => {}
        }
        let handle = match &self.target {
            Target::Local(h, _) => h,
            Target::Remote { handle, .. } => handle,
            Target::None | Target::Taking(_) => {
                self.held.push_back(c);
                return;
            }
        };
        match c {
            QueueCmd::Publish(p) => {
                if p.permit {
                    self.permits.add_permits(1);
                }
                self.dispatch_publish(p.msg, p.confirm);
            }
            c => {
                handle.tell(c);
            }
        }
    }

    /// A publish that waited: to the next log entry, or forwarded.
    fn dispatch_publish(&mut self, msg: MessageRef, confirm: Option<Arc<ConfirmTicket>>) {
        match &self.target {
            Target::Local(..) => self.batch.push((msg, confirm)),
            Target::Remote { handle, .. } => handle.send(0, msg, confirm, false),
            Target::None | Target::Taking(_) => {
                self.held
                    .push_back(QueueCmd::Publish(super::handle::Publish {
                        seq: 0,
                        msg,
                        confirm,
                        permit: false,
                    }))
            }
        }
    }

    async fn submit(&self, c: Command) -> Result<PendingWrite, GroupWriteError> {
        match &self.group {
            Some(g) => g.submit(c.encode()).await,
            None => Err(GroupWriteError::Failed("not a member".into())),
        }
    }

    /// Write the publishes gathered to the log.
    async fn submit_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let Target::Local(_, term) = self.target else {
            return;
        };
        let msgs = std::mem::take(&mut self.batch);
        let cmd = Command::Enqueue {
            at: crate::message::unix_ms(),
            msgs: msgs.iter().map(|(m, _)| m.to_stored()).collect(),
        };
        match self.submit(cmd).await {
            Ok(w) => self.writes.push_back((w, Kind::Publish(msgs, term))),
            Err(e) => {
                tracing::debug!(error = %e, "a quorum queue's publishes were not written");
                for (_, t) in msgs {
                    if let Some(t) = t {
                        t.nack();
                        t.settle();
                    }
                }
            }
        }
    }

    /// The leader's actor removed or counted messages: write it to the log.
    async fn replicate_ops(&mut self, ops: Vec<MessageOp>) {
        let (mut settle, mut count, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            match op {
                MessageOp::Remove { seq, .. } => settle.push(seq),
                MessageOp::SetMeta { seq, meta, .. } => count.push((seq, meta.deliveries)),
                MessageOp::RemoveRange { from, to, .. } => ranges.push((from, to)),
                // Deduplication keys are those of the messages held: a new
                // leader finds them again.
                _ => {}
            }
        }
        let mut cmds = Vec::new();
        if !count.is_empty() {
            cmds.push(Command::Count(count));
        }
        if !settle.is_empty() {
            cmds.push(Command::Settle(settle));
        }
        cmds.extend(
            ranges
                .into_iter()
                .map(|(from, to)| Command::SettleRange { from, to }),
        );
        for c in cmds {
            match self.submit(c).await {
                Ok(w) => self.writes.push_back((w, Kind::Ops)),
                Err(e) => {
                    tracing::debug!(error = %e, "a quorum queue's settlements were not written")
                }
            }
        }
    }

    /// A write's answer, in log order.
    async fn written(&mut self, done: Result<Vec<u8>, GroupWriteError>, kind: Kind) {
        match kind {
            Kind::Publish(msgs, term) => {
                let first = match done {
                    Ok(r) if r.len() == 8 => u64::from_be_bytes(r.try_into().unwrap_or_default()),
                    other => {
                        if let Err(e) = other {
                            tracing::debug!(error = %e, "a quorum queue's publishes were not committed");
                        }
                        for (_, t) in msgs {
                            if let Some(t) = t {
                                t.nack();
                                t.settle();
                            }
                        }
                        return;
                    }
                };
                let inner = match &self.target {
                    Target::Local(h, t) if *t == term => Some(h.clone()),
                    _ => None,
                };
                for (i, (m, t)) in msgs.into_iter().enumerate() {
                    let seq = first + i as u64;
                    match &inner {
                        Some(h) => h.send(seq, with_seq(&m, seq), t, false),
                        // Committed, but this node no longer leads: the
                        // next leader has it.
                        None => {
                            if let Some(t) = t {
                                t.settle();
                            }
                        }
                    }
                }
            }
            Kind::Ops => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "a quorum queue's settlements were not committed");
                }
            }
            Kind::TakeOver(term) => {
                if !matches!(self.target, Target::Taking(t) if t == term) {
                    return;
                }
                if let Err(e) = done {
                    tracing::debug!(error = %e, "taking over a quorum queue failed");
                    self.target = Target::None;
                    return;
                }
                self.take_over(term);
                self.submit_batch().await;
            }
        }
    }

    /// This node leads: start the queue actor with the replicated messages.
    fn take_over(&mut self, term: u64) {
        let adopted: Vec<Adopted> = self
            .machine
            .messages()
            .into_iter()
            .filter_map(|(seq, h)| {
                let m = Message::from_stored(seq, h.msg)?;
                Some((seq, m, h.enqueued_at, h.deliveries))
            })
            .collect();
        tracing::info!(queue = %self.info.name, term, messages = adopted.len(), "this node leads the quorum queue");
        let inner = spawn_replica(
            self.info.clone(),
            self.args.clone(),
            self.env.router.clone(),
            self.env.persister.clone(),
            (self.env.on_auto_delete)(),
            self.sink.clone(),
            adopted,
        );
        self.target = Target::Local(inner, term);
        self.reattach();
    }

    /// The front stops: at shutdown, or (`deleted`) because the queue was
    /// deleted, when this node's member of the group goes with its log.
    async fn stop(&mut self, deleted: bool) {
        if deleted {
            // Its consumers here hear basic.cancel.
            for c in self.consumers.drain(..) {
                let _ = c.conn.send(crate::events::ConnEvent::Cancelled {
                    chan_key: c.chan_key,
                    tag: c.tag.clone(),
                });
            }
        }
        self.retire();
        for (_, kind) in self.writes.drain(..) {
            if let Kind::Publish(msgs, _) = kind {
                for (_, t) in msgs {
                    if let Some(t) = t {
                        t.nack();
                        t.settle();
                    }
                }
            }
        }
        for (_, batch) in std::mem::take(&mut self.resends) {
            for (_, t) in batch {
                if let Some(t) = t {
                    t.nack();
                    t.settle();
                }
            }
        }
        for c in self.held.drain(..) {
            if let QueueCmd::Publish(p) = c {
                if let Some(t) = p.confirm {
                    t.nack();
                    t.settle();
                }
            }
        }
        if self.group.take().is_some() {
            let c = &self.env.cluster;
            if deleted {
                if let Err(e) = c.destroy_group(self.group_id).await {
                    tracing::warn!(error = %e, "cannot remove a deleted quorum queue's log");
                }
            } else {
                c.close_group(self.group_id).await;
            }
        }
    }
}

/// How long a new member may take to catch up before it votes.
const CATCH_UP: Duration = Duration::from_secs(60);

/// The membership change itself, on the leader: see
/// [`Front::change_member`].
async fn change_member(
    cluster: &ClusterNode,
    group: &Group,
    vhost: &str,
    queue: &str,
    add: bool,
    node: &str,
) -> Result<(), String> {
    let known = cluster.status().members;
    let Some(info) = known.iter().find(|m| m.name == node).cloned() else {
        return Err(format!("{node} is not a member of the cluster"));
    };
    let st = group.status();
    let mut voters: Vec<warren_cluster::NodeInfo> = st.members.clone();
    let listed = voters.iter().any(|m| m.name == node);
    match (add, listed) {
        (true, true) => {
            return Err(format!(
                "{node} is already a member of quorum queue '{queue}' in vhost '{vhost}'"
            ))
        }
        (false, false) => {
            return Err(format!(
                "{node} is not a member of quorum queue '{queue}' in vhost '{vhost}'"
            ))
        }
        (false, true) if voters.len() == 1 => {
            return Err(format!(
                "{node} is the last member of quorum queue '{queue}' in vhost '{vhost}'"
            ))
        }
        _ => {}
    }
    if add {
        voters.push(info);
        set_listed(cluster, vhost, queue, |m| {
            if !m.iter().any(|x| x == node) {
                m.push(node.to_owned());
            }
        })
        .await?;
        tokio::time::timeout(CATCH_UP, group.change_members(&voters))
            .await
            .map_err(|_| format!("{node} did not catch up within {CATCH_UP:?}"))?
            .map_err(|e| e.to_string())?;
    } else {
        voters.retain(|m| m.name != node);
        tokio::time::timeout(CATCH_UP, group.change_members(&voters))
            .await
            .map_err(|_| "the membership change did not commit".to_string())?
            .map_err(|e| e.to_string())?;
        set_listed(cluster, vhost, queue, |m| m.retain(|x| x != node)).await?;
    }
    Ok(())
}

/// Change the members the map lists for a quorum queue (only while its
/// definition is still the one read).
async fn set_listed(
    cluster: &ClusterNode,
    vhost: &str,
    queue: &str,
    change: impl FnOnce(&mut Vec<String>),
) -> Result<(), String> {
    let key = crate::replicate::topology::queue_key(vhost, queue);
    let Some(old) = cluster.get(&key) else {
        return Err(format!("no queue '{queue}' in vhost '{vhost}'"));
    };
    let mut new = old.clone();
    let mut members: Vec<String> = new
        .get("quorum")
        .and_then(|q| q.get("members"))
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    change(&mut members);
    if let Some(q) = new.get_mut("quorum") {
        q["members"] = serde_json::json!(members);
    }
    let cmd = warren_cluster::MetaCommand::IfEquals {
        key: key.clone(),
        value: old,
        then: Box::new(warren_cluster::MetaCommand::Put { key, value: new }),
    };
    match cluster.write(cmd).await {
        Ok(r) if r.previous.is_none() => Ok(()),
        Ok(_) => Err(format!(
            "queue '{queue}' in vhost '{vhost}' changed meanwhile: try again"
        )),
        Err(e) => Err(format!("{}{e}", crate::replicate::UNAVAILABLE)),
    }
}

/// A committed message as the leader's actor holds it: its sequence
/// stands for its store id (it is kept in the log, not the store).
fn with_seq(m: &MessageRef, seq: u64) -> MessageRef {
    Arc::new(Message {
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        header: m.header.clone(),
        body: m.body.clone(),
        stored: Some(seq),
    })
}
