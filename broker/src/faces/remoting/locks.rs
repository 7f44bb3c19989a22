//! LOCK_BATCH_MQ and UNLOCK_BATCH_MQ: an orderly consumer consumes a queue only while
//! the broker says it holds it. A lock is one client's for [`LOCK_LIFE`] after it last
//! asked (RocketMQ's `rebalance.lockMaxLiveTime`); clients renew theirs every 20 s.
//!
//! A queue being a lane of the group's delivery (`docs/remoting.md`), a lock keeps two
//! orderly members off one lane; the order messages reach a group in is the group's:
//! an ordered (FIFO) group gives the messages of one message group one at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use super::frame::Command;
use super::{codes, invalid};

/// How long a lock lasts without being asked for again.
pub const LOCK_LIFE: Duration = Duration::from_secs(60);

/// Most queues one request may name.
const MAX_QUEUES: usize = 4096;

/// Most locks held at once (beyond, a new lock is not granted until some expire).
const MAX_LOCKS: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Queue {
    group: String,
    topic: String,
    queue: i64,
}

/// Every lock.
#[derive(Debug, Default)]
pub struct Locks {
    held: Mutex<HashMap<Queue, (String, u64)>>,
}

/// A lock request's body.
struct Asked {
    group: String,
    client: String,
    queues: Vec<(String, String, i64)>,
}

/// A lock request's body, its names and queue ids checked (nothing else is kept).
fn asked(body: &[u8], queues: &dyn Fn(&str) -> usize) -> Result<Asked, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body does not parse: {e}"))?;
    let text = |k: &str| {
        v.get(k)
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let all = v
        .get("mqSet")
        .and_then(|s| s.as_array())
        .ok_or("the body has no mqSet")?;
    if all.len() > MAX_QUEUES {
        return Err(format!("mqSet names more than {MAX_QUEUES} queues"));
    }
    let group = text("consumerGroup");
    crate::service::name("group", &group).map_err(|e| e.to_string())?;
    let set = all
        .iter()
        .filter_map(|q| {
            let topic = q.get("topic").and_then(|t| t.as_str())?;
            let queue = q.get("queueId").and_then(serde_json::Value::as_i64)?;
            let known = crate::service::name("topic", topic).is_ok()
                || super::route::group_topic(topic).is_some();
            let count = i64::try_from(queues(topic)).unwrap_or(i64::MAX).max(1);
            (known && (0..count).contains(&queue)).then(|| {
                (
                    super::route::BROKER_NAME.to_string(),
                    topic.to_string(),
                    queue,
                )
            })
        })
        .collect();
    Ok(Asked {
        group,
        client: text("clientId"),
        queues: set,
    })
}

impl Locks {
    /// LOCK_BATCH_MQ from `client` (its connection's, whatever the body says: a
    /// client cannot take or free another's locks): the queues it holds now, newly or
    /// already (of those it `may` consume).
    pub fn lock(
        &self,
        req: &Command,
        client: &str,
        queues: impl Fn(&str) -> usize,
        may: impl Fn(&str, &str) -> bool,
    ) -> Command {
        let mut a = match asked(&req.body, &queues) {
            Ok(a) => a,
            Err(why) => return invalid(req, why),
        };
        a.client = client.to_string();
        let now = txmq_protocol::now_ms();
        let until = now + LOCK_LIFE.as_millis() as u64;
        let mut held = self.held.lock().expect("locks lock");
        if held.len() >= MAX_LOCKS {
            held.retain(|_, (_, expiry)| *expiry > now);
        }
        let mut granted = Vec::new();
        for (broker, topic, queue) in a.queues {
            if !may(&a.group, &topic) {
                continue;
            }
            let key = Queue {
                group: a.group.clone(),
                topic: topic.clone(),
                queue,
            };
            let free = match held.get(&key) {
                None => held.len() < MAX_LOCKS,
                Some((owner, expiry)) => *owner == a.client || *expiry <= now,
            };
            if free {
                held.insert(key, (a.client.clone(), until));
                granted.push(json!({"brokerName": broker, "queueId": queue, "topic": topic}));
            }
        }
        Command::answer(req, codes::SUCCESS, None)
            .with_body(serde_json::to_vec(&json!({ "lockOKMQSet": granted })).unwrap_or_default())
    }

    /// UNLOCK_BATCH_MQ from `client`: its locks on these queues end.
    pub fn unlock(&self, req: &Command, client: &str, queues: impl Fn(&str) -> usize) -> Command {
        let mut a = match asked(&req.body, &queues) {
            Ok(a) => a,
            Err(why) => return invalid(req, why),
        };
        a.client = client.to_string();
        let mut held = self.held.lock().expect("locks lock");
        for (_, topic, queue) in a.queues {
            let key = Queue {
                group: a.group.clone(),
                topic,
                queue,
            };
            if held.get(&key).is_some_and(|(owner, _)| *owner == a.client) {
                held.remove(&key);
            }
        }
        Command::answer(req, codes::SUCCESS, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client: &str, queues: &[i64]) -> Command {
        let set: Vec<_> = queues
            .iter()
            .map(|q| json!({"brokerName": "txmq", "queueId": q, "topic": "T"}))
            .collect();
        Command::default().with_body(
            serde_json::to_vec(&json!({"consumerGroup": "g", "clientId": client, "mqSet": set}))
                .unwrap(),
        )
    }

    fn granted(answer: &Command) -> Vec<i64> {
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        v["lockOKMQSet"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["queueId"].as_i64().unwrap())
            .collect()
    }

    fn yes(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn a_queue_is_one_clients_until_it_lets_go() {
        let l = Locks::default();
        assert_eq!(
            granted(&l.lock(&request("a", &[0, 1]), "a", |_| 8, yes)),
            [0, 1]
        );
        assert_eq!(
            granted(&l.lock(&request("b", &[1, 2]), "b", |_| 8, yes)),
            [2]
        );
        assert_eq!(
            granted(&l.lock(&request("a", &[0, 1]), "a", |_| 8, yes)),
            [0, 1],
            "renewed"
        );
        l.unlock(&request("b", &[1]), "b", |_| 8);
        assert!(
            granted(&l.lock(&request("b", &[1]), "b", |_| 8, yes)).is_empty(),
            "not b's to free"
        );
        l.unlock(&request("a", &[1]), "a", |_| 8);
        assert_eq!(granted(&l.lock(&request("b", &[1]), "b", |_| 8, yes)), [1]);
        assert_eq!(
            l.lock(&Command::default(), "a", |_| 8, yes).code,
            codes::INVALID_PARAMETER
        );
        assert!(granted(&l.lock(&request("c", &[7]), "c", |_| 8, |_, _| false)).is_empty());
        // Queue ids outside the topic's queues are not locked.
        assert!(granted(&l.lock(&request("c", &[8, -1]), "c", |_| 8, yes)).is_empty());
        // A body that names another client changes nothing: the connection's decides.
        l.unlock(&request("a", &[0]), "b", |_| 8);
        assert!(granted(&l.lock(&request("a", &[0]), "b", |_| 8, yes)).is_empty());
    }
}
