//! The management API's health checks under an alarm: what RabbitMQ's
//! conformance run cannot show (the reference has no alarm on demand).

use std::time::Duration;
use warren_tests::http::request;
use warren_tests::{within, TestBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alarm_health_checks_fail_while_an_alarm_is_on() {
    let b = TestBroker::start_with(|c| c.management = Some("127.0.0.1:0".parse().unwrap())).await;
    let (Some(broker), Some(alarms)) = (b.broker(), b.alarms()) else {
        return;
    };
    let api = broker.listen_addrs.http.unwrap();
    let get = |path: &str| request(api, "GET", path, ("guest", "guest"), None);
    let r = get("/api/health/checks/alarms");
    assert_eq!(r.status, 200, "{r:?}");
    // A memory limit of 0: the memory alarm goes on at the next sample.
    alarms.set_memory_limit(0);
    within("the memory alarm", async {
        while !alarms.state().memory {
            alarms.refresh();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (path, scope) in [
        ("/api/health/checks/alarms", "in the cluster"),
        ("/api/health/checks/local-alarms", "on the node"),
    ] {
        let r = get(path);
        assert_eq!(r.status, 503, "{r:?}");
        let j = r.json();
        assert_eq!(j["status"], "failed");
        assert_eq!(j["reason"], format!("There are alarms in effect {scope}"));
        assert_eq!(j["alarms"][0]["resource"], "memory");
    }
    let nodes = get("/api/nodes").json();
    assert_eq!(nodes[0]["mem_alarm"], true);
}
