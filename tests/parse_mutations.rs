//! A deterministic mutation run of the parser's invariants on stable Rust (the cargo-fuzz
//! target in fuzz/ does the same, coverage-guided, on nightly): every corpus message,
//! mutated by flips, truncations, splices and insertions of SIP-significant bytes. The
//! corpora are ours (tests/corpus) and, where ../shared is there, RFC 4475 and RFC 5118;
//! a clone without ../shared mutates its own corpus only, and says so.

mod conformance;

use conformance::{corpus_dir, messages, own_corpus};

fn corpus() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = own_corpus().into_iter().map(|(_, m)| m).collect();
    for name in ["rfc4475", "rfc5118"] {
        if let Some(dir) = corpus_dir(name) {
            out.extend(messages(&dir).into_iter().map(|(_, m)| m));
        }
    }
    out
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\r\n ",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b"\"",
    b"[",
    b"]",
    b"@",
    b"%",
    b"\0",
    b"\xff",
    b"Content-Length: 99999\r\n",
    b"l: -1\r\n",
    b"Via: SIP/2.0/UDP [::1\r\n",
    b" ",
    b"\t",
    b"=",
    b"?",
    b"SIP/2.0",
    b"\r\n\r\n",
];

#[test]
fn mutated_corpus_never_breaks_invariants() {
    let corpus = corpus();
    // 24 messages of our own, 49 of RFC 4475 and 12 of RFC 5118 where ../shared is there.
    assert!(corpus.len() >= 24);
    let mut rng = XorShift(0x5eed_1234_abcd_0042);
    for _ in 0..100_000 {
        let mut m = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(m.len() + 1);
            match rng.below(5) {
                0 if !m.is_empty() => {
                    let i = at.min(m.len() - 1);
                    m[i] ^= 1 << rng.below(8);
                }
                1 => m.truncate(at),
                2 => {
                    let ins = INTERESTING[rng.below(INTERESTING.len())];
                    m.splice(at..at, ins.iter().copied());
                }
                3 if !m.is_empty() => {
                    let end = (at + rng.below(16)).min(m.len());
                    m.drain(at.min(end)..end);
                }
                _ => {
                    let other = &corpus[rng.below(corpus.len())];
                    let from = rng.below(other.len());
                    let end = (from + rng.below(64)).min(other.len());
                    m.splice(at..at, other[from..end].iter().copied());
                }
            }
        }
        strowger::uas::check_invariants(&m);
    }
}
