//! The whole server on a paused tokio clock (issue 19's virtual clock): with the Lua VMs
//! run inline on the test's thread (`strowger::script::run_vms_inline`) and the memory
//! transport, a dial plan's 20 s ring timeout passes in virtual time while the wall clock
//! barely moves, and the caller gets the plan's answer.

use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;
use strowger::transport::MemoryNetwork;

#[test]
fn a_twenty_second_ring_timeout_takes_no_wall_time() {
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
        std::fs::write(
            &plan,
            r#"
function on_invite(call)
  -- Nobody is at 10.9.0.99: the INVITE goes unanswered until the ring timeout.
  local r = call:dial("sip:nobody@10.9.0.99:5060;transport=memory", { timeout = 20 })
  call:reject(480, "rang " .. tostring(r.status))
end
"#,
        )
        .unwrap();
        let mut config = strowger::config::Config::default();
        let server_addr: SocketAddr = "10.9.0.1:5060".parse().unwrap();
        config.sip.listen = vec![format!("memory:{server_addr}")];
        config.sip.domain = "strowger.test".into();
        config.http.listen = "127.0.0.1:0".into();
        config.storage.dir = dir.path().join("data").display().to_string();
        config.script.path = plan.display().to_string();
        config.script.vm_pool_size = 1;
        let server = strowger::server::start(&config).await.expect("server starts");

        let phone_addr: SocketAddr = "10.9.0.2:5060".parse().unwrap();
        let mut phone = MemoryNetwork::global().endpoint(phone_addr);
        let invite = format!(
            "INVITE sip:bob@strowger.test SIP/2.0\r\nVia: SIP/2.0/UDP {phone_addr};branch=z9hG4bKvc1\r\n\
             From: <sip:alice@strowger.test>;tag=a\r\nTo: <sip:bob@strowger.test>\r\n\
             Call-ID: vc1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContact: <sip:alice@{phone_addr}>\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let wall = std::time::Instant::now();
        let virtual_start = tokio::time::Instant::now();
        phone.send(server_addr, Bytes::from(invite));
        let final_answer = loop {
            let (_, data) = tokio::time::timeout(Duration::from_secs(120), phone.recv())
                .await
                .expect("an answer within 120 virtual seconds")
                .expect("network open");
            let text = String::from_utf8_lossy(&data).into_owned();
            if text.starts_with("SIP/2.0 ") && !text.starts_with("SIP/2.0 1") {
                break text;
            }
        };
        let virtual_elapsed = virtual_start.elapsed();
        assert!(
            final_answer.starts_with("SIP/2.0 480 rang 408"),
            "{final_answer}"
        );
        assert!(
            virtual_elapsed >= Duration::from_secs(20),
            "virtual {virtual_elapsed:?}"
        );
        assert!(
            wall.elapsed() < Duration::from_secs(3),
            "wall {:?} (virtual {virtual_elapsed:?})",
            wall.elapsed()
        );
        server.shutdown(Duration::from_millis(10)).await;
    });
}
