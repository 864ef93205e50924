//! Simulated phones (`strowger::simulate`) against the real server, in process, on the
//! memory network, on a paused tokio clock with the Lua VMs run inline: the dial plan
//! finds the registered callee, and a 20 s ring timeout passes in virtual time only.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use strowger::simulate::{Behaviour, Device, DeviceSpec, Direction, Side};
use strowger::transport::MemoryNetwork;

const PLAN: &str = r#"
function on_invite(call)
  local devices = registrar.lookup("sip:" .. call.ruri.user .. "@" .. call.ruri.host)
  if #devices == 0 then
    return call:reject(404, "Not Found")
  end
  -- No decision after the dial: the caller gets the callee's answer.
  call:dial(devices, { timeout = 20 })
end
"#;

const DOMAIN: &str = "strowger.test";

/// Runs `test` with a server at `net.1:5060` (its own /24 of the process's memory network,
/// so that tests running side by side do not meet) on a paused current_thread runtime.
fn with_server<F, Fut>(net: [u8; 3], test: F)
where
    F: FnOnce(SocketAddr, [u8; 3]) -> Fut,
    Fut: Future<Output = ()>,
{
    with_server_plan(net, PLAN, test)
}

/// [`with_server`] with the dial plan `plan`.
fn with_server_plan<F, Fut>(net: [u8; 3], plan_text: &str, test: F)
where
    F: FnOnce(SocketAddr, [u8; 3]) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        strowger::script::run_vms_inline();
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.lua");
        std::fs::write(&plan, plan_text).unwrap();
        let server_addr = SocketAddr::from(([net[0], net[1], net[2], 1], 5060));
        let mut config = strowger::config::Config::default();
        config.sip.listen = vec![format!("memory:{server_addr}")];
        config.sip.domain = DOMAIN.into();
        config.http.listen = "127.0.0.1:0".into();
        config.storage.dir = dir.path().join("data").display().to_string();
        config.script.path = plan.display().to_string();
        config.script.vm_pool_size = 1;
        let server = strowger::server::start(&config)
            .await
            .expect("server starts");
        test(server_addr, net).await;
        server.shutdown(Duration::from_millis(10)).await;
    });
}

async fn phone(user: &str, server: SocketAddr, net: [u8; 3], host: u8, b: Behaviour) -> Device {
    let spec = DeviceSpec::phone(user, server)
        .domain(DOMAIN)
        .at(SocketAddr::from(([net[0], net[1], net[2], host], 5060)))
        .on_invite(b);
    Device::start(&MemoryNetwork::global(), spec)
        .await
        .unwrap_or_else(|e| panic!("{user} starts: {e}"))
}

/// Phone 1000 (the caller) and phone 1001, which answers `after` ringing.
async fn caller_and_callee(server: SocketAddr, net: [u8; 3], after: Duration) -> (Device, Device) {
    let a = phone("1000", server, net, 10, Behaviour::default()).await;
    let b = phone("1001", server, net, 11, Behaviour::Answer { after }).await;
    (a, b)
}

#[test]
fn a_registered_phone_is_rung_answers_and_the_caller_hangs_up() {
    with_server([10, 77, 1], |server, net| async move {
        let (a, b) = caller_and_callee(server, net, Duration::from_secs(2)).await;
        let reg = b.registration().expect("registered");
        assert_eq!((reg.status, reg.expires), (200, Some(3600)), "{reg:?}");

        let out = a
            .call("1001", &[("X-Case".into(), "42".into())])
            .await
            .unwrap();
        assert_eq!(out.status, 200, "{}", strowger::simulate::ladder(&[&a, &b]));
        assert!(out.provisional.contains(&180), "{:?}", out.provisional);
        assert!(out.elapsed >= Duration::from_secs(2), "{:?}", out.elapsed);

        let inc = b.wait_incoming(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(inc.number.as_deref(), Some("1001"));
        // The B2BUA's own leg: a Call-ID of its own, to the registered Contact.
        assert_ne!(inc.call_id, out.call.call_id());
        assert!(inc.ruri.contains(&b.addr().to_string()), "{}", inc.ruri);

        assert_eq!(out.call.hangup().await.unwrap(), 200);
        let b_call = b.call_handle(&inc.call_id).unwrap();
        assert_eq!(
            b_call.wait_ended(Duration::from_secs(5)).await.unwrap(),
            Side::Remote
        );
        let ladder = strowger::simulate::ladder(&[&a, &b]);
        let got: Vec<String> = b
            .log()
            .iter()
            .filter(|e| e.direction == Direction::Received)
            .map(|e| e.label())
            .collect();
        assert_eq!(got, ["200", "INVITE", "ACK", "BYE"], "{ladder}");
    });
}

/// `call:dial`'s `max_duration`: armed at the answer, the call is ended by the server with
/// a BYE to each party when it runs out (in virtual time), and not before.
#[test]
fn max_duration_ends_the_answered_call_with_a_bye_to_both() {
    const LIMITED: &str = r#"
function on_invite(call)
  local devices = registrar.lookup("sip:" .. call.ruri.user .. "@" .. call.ruri.host)
  call:dial(devices, { timeout = 20, max_duration = 30 })
end
"#;
    with_server_plan([10, 77, 6], LIMITED, |server, net| async move {
        let (a, b) = caller_and_callee(server, net, Duration::from_secs(5)).await;
        let out = a.call("1001", &[]).await.unwrap();
        assert_eq!(out.status, 200, "{}", strowger::simulate::ladder(&[&a, &b]));
        // Rung for 5 s: the 30 s count from the answer, not from the INVITE.
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(
            out.call.is_up(),
            "{}",
            strowger::simulate::ladder(&[&a, &b])
        );
        assert_eq!(
            out.call.wait_ended(Duration::from_secs(5)).await.unwrap(),
            Side::Remote,
            "{}",
            strowger::simulate::ladder(&[&a, &b])
        );
        let inc = b.wait_incoming(1, Duration::from_secs(1)).await.unwrap();
        let b_call = b.call_handle(&inc.call_id).unwrap();
        assert_eq!(
            b_call.wait_ended(Duration::from_secs(5)).await.unwrap(),
            Side::Remote
        );
    });
}

#[test]
fn a_busy_phone_gives_the_caller_486() {
    with_server([10, 77, 2], |server, net| async move {
        let a = phone("1000", server, net, 10, Behaviour::default()).await;
        let b = phone("1001", server, net, 11, Behaviour::Busy).await;
        let out = a.call("1001", &[]).await.unwrap();
        assert_eq!(out.status, 486, "{}", strowger::simulate::ladder(&[&a, &b]));
        assert_eq!(b.incoming()[0].final_status, Some(486));
        assert!(!out.call.is_up());
    });
}

#[test]
fn an_unknown_number_is_refused_by_the_plan() {
    with_server([10, 77, 3], |server, net| async move {
        let a = phone("1000", server, net, 10, Behaviour::default()).await;
        let out = a.call("5555", &[]).await.unwrap();
        assert_eq!((out.status, out.reason.as_str()), (404, "Not Found"));
    });
}

#[test]
fn a_twenty_second_ring_timeout_takes_virtual_time_only() {
    with_server([10, 77, 4], |server, net| async move {
        let a = phone("1000", server, net, 10, Behaviour::default()).await;
        let b = phone("1001", server, net, 11, Behaviour::Ring).await;
        let wall = std::time::Instant::now();
        let out = a.call("1001", &[]).await.unwrap();
        let ladder = strowger::simulate::ladder(&[&a, &b]);
        assert!(out.status >= 400, "{ladder}");
        assert!(
            out.elapsed >= Duration::from_secs(20) && out.elapsed < Duration::from_secs(21),
            "virtual {:?}\n{ladder}",
            out.elapsed
        );
        assert!(
            wall.elapsed() < Duration::from_secs(2),
            "wall {:?}",
            wall.elapsed()
        );
        // The server gave up on the callee with a CANCEL: 200 to it, 487 to the INVITE.
        let inc = &b.incoming()[0];
        assert_eq!(inc.final_status, Some(487), "{ladder}");
        assert_eq!(inc.ended_by, Some(Side::Remote));
    });
}

/// RFC 3515 through the B2BUA: the callee's REFER gets 202, the target is called, the
/// caller re-INVITEd to it, the transferor NOTIFYed and then released with a BYE.
#[test]
fn the_callee_transfers_the_caller_with_refer() {
    with_server([10, 77, 5], |server, net| async move {
        let a = phone("1000", server, net, 10, Behaviour::default()).await;
        let b = phone(
            "1001",
            server,
            net,
            11,
            Behaviour::AnswerThenRefer {
                after: Duration::from_secs(1),
                target: "1002".into(),
            },
        )
        .await;
        let c = phone("1002", server, net, 12, Behaviour::default()).await;
        let out = a.call("1001", &[]).await.unwrap();
        assert_eq!(out.status, 200);
        let b_call = b
            .call_handle(
                &b.wait_incoming(1, Duration::from_secs(5))
                    .await
                    .unwrap()
                    .call_id,
            )
            .unwrap();
        let ended = b_call.wait_ended(Duration::from_secs(30)).await;
        let ladder = strowger::simulate::ladder(&[&a, &b, &c]);
        assert_eq!(ended.ok(), Some(Side::Remote), "{ladder}");
        let received = |d: &Device| -> Vec<String> {
            d.log()
                .iter()
                .filter(|e| e.direction == Direction::Received)
                .map(|e| e.label())
                .collect()
        };
        assert_eq!(
            received(&b),
            ["200", "INVITE", "ACK", "202", "NOTIFY", "NOTIFY", "BYE"],
            "{ladder}"
        );
        assert_eq!(c.incoming().len(), 1, "{ladder}");
        assert_eq!(c.incoming()[0].final_status, Some(200));
        // The caller stays in its call, re-INVITEd towards the target.
        assert_eq!(received(&a)[4..], ["INVITE", "ACK"], "{ladder}");
        assert!(out.call.is_up());
    });
}
