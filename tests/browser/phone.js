// A browser phone: JsSIP registered over (secure) WebSocket, calls with the fake
// microphone. run.js drives it through window.phone and hears its events through
// window.report (a Playwright binding).
'use strict';

(function () {
  const JsSIP = window.JsSIP;
  const report = (event, data) => {
    const e = Object.assign({ event }, data || {});
    if (typeof window.report === 'function') {
      window.report(e);
    }
  };

  // Only loopback candidates (127.0.0.0/8, ::1) may be offered or used: the two browsers
  // are on this machine, and no ICE check may go to another address. The connection
  // line's default address is set to 127.0.0.1 too.
  const isLoopback = (addr) => /^127\./.test(addr) || addr === '::1';
  function loopbackOnly(sdp) {
    const kept = [];
    let dropped = 0;
    for (const line of sdp.split(/\r\n/)) {
      const m = /^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ /.exec(line);
      if (m && !isLoopback(m[1])) {
        dropped++;
        continue;
      }
      if (/^c=IN IP[46] /.test(line)) {
        kept.push('c=IN IP4 127.0.0.1');
        continue;
      }
      kept.push(line);
    }
    return { sdp: kept.join('\r\n'), dropped };
  }
  function candidates(sdp) {
    return sdp
      .split(/\r\n/)
      .map((l) => /^a=candidate:\S+ \d+ (\S+) \d+ (\S+) (\d+) typ (\S+)/.exec(l))
      .filter(Boolean)
      .map((m) => `${m[1].toLowerCase()} ${m[2]}:${m[3]} ${m[4]}`);
  }

  let ua = null;
  let session = null;
  const pcConfig = { iceServers: [], iceTransportPolicy: 'all' };
  const mediaConstraints = { audio: true, video: false };

  function watch(s) {
    session = s;
    const base = () => ({ direction: s.direction });
    s.on('sdp', (e) => {
      const r = loopbackOnly(e.sdp);
      e.sdp = r.sdp;
      report('sdp', Object.assign(base(), {
        originator: e.originator,
        type: e.type,
        dropped: r.dropped,
        candidates: candidates(r.sdp),
      }));
    });
    s.on('progress', (e) => report('progress', Object.assign(base(), {
      originator: e.originator,
      status: e.response ? e.response.status_code : null,
    })));
    s.on('accepted', (e) => report('accepted', Object.assign(base(), { originator: e.originator })));
    s.on('confirmed', (e) => report('confirmed', Object.assign(base(), { originator: e.originator })));
    s.on('ended', (e) => {
      report('ended', Object.assign(base(), { originator: e.originator, cause: e.cause }));
      if (session === s) session = null;
    });
    s.on('failed', (e) => {
      report('failed', Object.assign(base(), {
        originator: e.originator,
        cause: e.cause,
        status: e.message && e.message.status_code ? e.message.status_code : null,
      }));
      if (session === s) session = null;
    });
    const onPc = (pc) => {
      pc.addEventListener('iceconnectionstatechange', () =>
        report('ice', Object.assign(base(), { state: pc.iceConnectionState })));
    };
    if (s.connection) onPc(s.connection);
    s.on('peerconnection', (e) => onPc(e.peerconnection));
  }

  window.phone = {
    version: JsSIP.version,

    // Registers `uri` through the WebSocket server `ws`; resolves when registered.
    start(ws, uri) {
      return new Promise((resolve, reject) => {
        const socket = new JsSIP.WebSocketInterface(ws);
        ua = new JsSIP.UA({
          sockets: [socket],
          uri,
          register: true,
          register_expires: 300,
          session_timers: false,
          connection_recovery_min_interval: 1,
          connection_recovery_max_interval: 2,
          user_agent: `JsSIP ${JsSIP.version} (Strowger browser test)`,
        });
        ua.on('connecting', () => report('connecting', { ws }));
        ua.on('connected', () => report('connected', { ws }));
        ua.on('disconnected', (e) => report('disconnected', {
          ws,
          error: !!(e && e.error),
          code: e && e.code,
          reason: e && e.reason,
        }));
        ua.on('registered', (e) => {
          report('registered', { status: e.response.status_code });
          resolve();
        });
        ua.on('unregistered', (e) => report('unregistered', {
          status: e && e.response ? e.response.status_code : null,
        }));
        ua.on('registrationFailed', (e) => {
          const status = e.response ? e.response.status_code : null;
          report('registrationFailed', { cause: e.cause, status });
          reject(new Error(`registration failed: ${e.cause} ${status}`));
        });
        ua.on('newRTCSession', (e) => {
          if (e.originator === 'remote') {
            if (session) {
              e.session.terminate({ status_code: 486 });
              return;
            }
            watch(e.session);
            report('incoming', {
              direction: 'incoming',
              from: e.request.from.uri.toString(),
              ruri: e.request.ruri.toString(),
            });
          }
        });
        document.getElementById('status').textContent = `starting ${uri}`;
        ua.start();
      });
    },

    call(target) {
      const s = ua.call(target, { mediaConstraints, pcConfig });
      watch(s);
      report('calling', { direction: 'outgoing', target });
    },

    answer() {
      if (!session) throw new Error('no call to answer');
      session.answer({ mediaConstraints, pcConfig });
    },

    hangup() {
      if (!session) throw new Error('no call to hang up');
      session.terminate();
    },

    // The call's media as WebRTC sees it: ICE state, the selected candidate pair, audio
    // counters, and every address an ICE check was sent to.
    async media() {
      const pc = session && session.connection;
      if (!pc) return null;
      const stats = await pc.getStats();
      const byId = new Map();
      stats.forEach((r) => byId.set(r.id, r));
      const out = {
        ice: pc.iceConnectionState,
        pair: null,
        checked: [],
        packetsReceived: 0,
        bytesReceived: 0,
        packetsSent: 0,
        bytesSent: 0,
      };
      const addr = (c) => (c ? `${c.protocol} ${c.address || c.ip}:${c.port} ${c.candidateType}` : '?');
      let transport = null;
      stats.forEach((r) => {
        if (r.type === 'transport' && r.selectedCandidatePairId) transport = r;
        if (r.type === 'candidate-pair' && (r.requestsSent || r.responsesSent)) {
          out.checked.push({
            local: addr(byId.get(r.localCandidateId)),
            remote: addr(byId.get(r.remoteCandidateId)),
            state: r.state,
          });
        }
        if (r.type === 'inbound-rtp' && r.kind === 'audio') {
          out.packetsReceived += r.packetsReceived || 0;
          out.bytesReceived += r.bytesReceived || 0;
        }
        if (r.type === 'outbound-rtp' && r.kind === 'audio') {
          out.packetsSent += r.packetsSent || 0;
          out.bytesSent += r.bytesSent || 0;
        }
      });
      if (transport) {
        const p = byId.get(transport.selectedCandidatePairId);
        if (p) {
          out.pair = {
            local: addr(byId.get(p.localCandidateId)),
            remote: addr(byId.get(p.remoteCandidateId)),
            state: p.state,
          };
        }
      }
      return out;
    },

    stop() {
      if (ua) ua.stop();
    },
  };
  document.getElementById('status').textContent = `JsSIP ${JsSIP.version} loaded`;
  report('loaded', { jssip: JsSIP.version });
})();
