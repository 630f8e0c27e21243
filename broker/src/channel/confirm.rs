//! Publisher confirms (`confirm.select`). Sequence numbers are assigned per
//! publish in order; a publish is confirmed once every queue it was routed
//! to has taken it (and, for a persistent one, the store has synced it), or
//! nacked if a queue refused it. Confirms go out in runs, one `basic.ack` or
//! `basic.nack` with `multiple` per run per batch of work.

use super::{Channel, Ctx, Output};
use crate::error::{precondition, AmqpResult};
use std::collections::VecDeque;
use warren_protocol::amqp::{confirm, AMQPClass};
use warren_protocol::method;

/// Publisher-confirm bookkeeping. Sequence numbers are assigned in order, so
/// outstanding ones form a window: a deque indexed by `seq - base`.
#[derive(Default)]
pub struct Confirms {
    /// Sequence number of `done[0]`.
    pub base: u64,
    /// Per outstanding sequence: confirmed yet?
    pub done: VecDeque<bool>,
    /// Confirms arrived since the last flush.
    pub dirty: bool,
    /// Outstanding sequences refused by a queue (basic.nack), ascending.
    pub nacked: VecDeque<u64>,
}

impl Confirms {
    pub fn new() -> Self {
        Confirms {
            base: 1,
            done: VecDeque::new(),
            dirty: false,
            nacked: VecDeque::new(),
        }
    }
    /// Assign the next sequence number.
    pub fn assign(&mut self) -> u64 {
        self.done.push_back(false);
        self.base + self.done.len() as u64 - 1
    }
    pub fn confirm(&mut self, seq: u64) {
        if let Some(d) = seq
            .checked_sub(self.base)
            .and_then(|i| self.done.get_mut(i as usize))
        {
            *d = true;
            self.dirty = true;
        }
    }
    /// Settle `seq` as refused: it will be nacked.
    pub fn nack(&mut self, seq: u64) {
        if seq >= self.base && seq < self.base + self.done.len() as u64 {
            let i = self.nacked.partition_point(|&s| s < seq);
            if self.nacked.get(i) != Some(&seq) {
                self.nacked.insert(i, seq);
            }
        }
        self.confirm(seq);
    }
    /// Pop the confirmed prefix as runs of acks and nacks, calling
    /// `emit(last_seq, multiple, nack)` once per run (everything before a run
    /// is settled, so `multiple` covers exactly the run). Returns how many
    /// were acked (not nacked).
    pub fn take_ready(&mut self, mut emit: impl FnMut(u64, bool, bool)) -> u64 {
        self.dirty = false;
        let mut acked = 0;
        let mut run: Option<(u64, bool)> = None; // (first seq, nack)
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            let seq = self.base;
            self.base += 1;
            let nack = self.nacked.front() == Some(&seq);
            if nack {
                self.nacked.pop_front();
            } else {
                acked += 1;
            }
            match run {
                Some((first, kind)) if kind != nack => {
                    emit(seq - 1, seq - 1 > first, kind);
                    run = Some((seq, nack));
                }
                Some(_) => {}
                None => run = Some((seq, nack)),
            }
        }
        if let Some((first, kind)) = run {
            let last = self.base - 1;
            emit(last, last > first, kind);
        }
        acked
    }
}

impl Channel {
    pub(super) fn confirm_select(&mut self, cx: &mut Ctx<'_>, nowait: bool) -> AmqpResult<()> {
        if self.tx.is_some() {
            return Err(precondition("cannot switch from tx to confirm mode"));
        }
        if self.confirms.is_none() {
            self.confirms = Some(Confirms::new());
        }
        if !nowait {
            cx.out.send_method(
                self.number,
                AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
            );
        }
        Ok(())
    }

    /// Send the confirms that became ready since the last call; returns
    /// how many publishes were acked.
    pub fn flush_confirms(&mut self, out: &mut dyn Output) -> u64 {
        let Some(cf) = self.confirms.as_mut() else {
            return 0;
        };
        if !cf.dirty {
            return 0;
        }
        let (buf, number) = (out.buf(), self.number);
        cf.take_ready(|last, multiple, nack| {
            if nack {
                method::put_nack(buf, number, last, multiple);
            } else {
                method::put_ack(buf, number, last, multiple);
            }
        })
    }
}
