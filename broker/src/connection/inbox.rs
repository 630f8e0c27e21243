//! The connection's mailbox: events from queues (deliveries, cancellations),
//! direct replies and publisher confirms, each handed to the channel it is
//! for. A channel number can be reused after close, so events carry the
//! channel's key too, and events for an older incarnation are dropped.

use super::{ctx, Connection};
use crate::channel::consume::{took_in_flight, took_in_flight_n, Deliver};
use crate::channel::Ctx;
use crate::events::ConnEvent;

impl Connection {
    pub(super) fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver {
                chan_key,
                channel,
                tag,
                msg,
                redelivered,
                seq,
                queue: _,
                in_flight,
            } => {
                let reopened = took_in_flight(&in_flight);
                if let Some(c) = self.channels.get_mut(&channel) {
                    let d = Deliver {
                        chan_key,
                        tag: &tag,
                        msg: &msg,
                        redelivered,
                        seq,
                    };
                    c.deliver(&mut ctx!(self), d, reopened);
                }
            }
            ConnEvent::DeliverMany {
                chan_key,
                channel,
                tag,
                items,
                in_flight,
            } => {
                let mut reopened = took_in_flight_n(&in_flight, items.len() as u32);
                if let Some(c) = self.channels.get_mut(&channel) {
                    for (msg, redelivered, seq) in &items {
                        let d = Deliver {
                            chan_key,
                            tag: &tag,
                            msg,
                            redelivered: *redelivered,
                            seq: *seq,
                        };
                        c.deliver(&mut ctx!(self), d, std::mem::take(&mut reopened));
                    }
                }
            }
            ConnEvent::Reply {
                chan_key,
                channel,
                tag,
                msg,
            } => {
                if let Some(c) = self.channels.get_mut(&channel) {
                    c.deliver_reply(&mut ctx!(self), chan_key, &tag, &msg);
                }
            }
            ConnEvent::Confirm {
                chan_key,
                seq,
                nack,
            } => self.settle_confirms(chan_key, [(seq, nack)]),
            ConnEvent::Confirms { chan_key, seqs } => self.settle_confirms(chan_key, seqs),
            ConnEvent::CancelOk { chan_key, tag } => {
                if let Some(c) = self.channels.values_mut().find(|c| c.key == chan_key) {
                    c.cancel_done(&mut ctx!(self), &tag);
                }
            }
            ConnEvent::Describe { reply } => {
                let mut v: Vec<crate::events::ChannelInfo> = self
                    .channels
                    .values()
                    .filter(|c| !c.closing)
                    .map(|c| crate::events::ChannelInfo {
                        number: c.number,
                        consumers: c.consumers.len() as u32,
                        unacked: c.unacked.len() as u64,
                        prefetch: c.prefetch,
                        global_prefetch: c.credit.limit.load(std::sync::atomic::Ordering::Relaxed),
                        confirm: c.confirms.is_some(),
                        transactional: c.tx.is_some(),
                    })
                    .collect();
                v.sort_by_key(|c| c.number);
                let _ = reply.send(v);
            }
            ConnEvent::Close { code, text } => {
                self.forced = Some(crate::error::AmqpError::new(code, text));
            }
            ConnEvent::TimedOut {
                chan_key,
                tag,
                timeout,
                queue,
                returned,
            } => {
                let Some(c) = self
                    .channels
                    .values_mut()
                    .find(|c| c.key == chan_key && !c.closing)
                else {
                    return;
                };
                let n = c.number;
                match tag {
                    Some(tag) => c.timed_out(&mut ctx!(self), &tag, queue, &returned),
                    None => self.close_channel(
                        n,
                        crate::error::precondition(format!(
                            "delivery acknowledgement on channel {n} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more"
                        )),
                    ),
                }
            }
            ConnEvent::Cancelled { chan_key, tag } => {
                if let Some(c) = self.channels.values_mut().find(|c| c.key == chan_key) {
                    c.cancelled_by_queue(&mut ctx!(self), &tag);
                }
            }
        }
    }

    /// Publisher confirms (`(seq, nack)`) for the channel with key
    /// `chan_key`, if it is still open and in confirm mode.
    fn settle_confirms(&mut self, chan_key: u64, seqs: impl IntoIterator<Item = (u64, bool)>) {
        let c = self.channels.values_mut().find(|c| c.key == chan_key);
        if let Some(cf) = c.and_then(|c| c.confirms.as_mut()) {
            for (seq, nack) in seqs {
                if nack {
                    cf.nack(seq);
                } else {
                    cf.confirm(seq);
                }
            }
        }
    }
}
