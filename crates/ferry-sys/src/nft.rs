//! nf_tables over netlink (NETLINK_NETFILTER): just enough to install and remove a table of
//! drop rules in one transaction. Running `nft` costs a fork, an exec and a parse (10-20 ms
//! under load), and Ferry does it while a process is frozen: a netlink batch costs well under
//! a millisecond.
//!
//! Tables are in the `inet` family. Messages follow include/uapi/linux/netfilter/nf_tables.h.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// include/uapi/linux/netfilter/nfnetlink.h and nf_tables.h; the libc crate has none of them.
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETTABLE: u16 = 1;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// The first 32-bit register: loads go into consecutive ones from here.
pub const REG32_00: u32 = 8;
/// `meta nfproto` (the packet's family in an inet table) and `meta l4proto`.
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
/// Payload bases.
pub const NETWORK_HEADER: u32 = 1;
pub const TRANSPORT_HEADER: u32 = 2;
/// Netfilter hooks of the inet family.
pub const HOOK_INPUT: u32 = 1;
pub const HOOK_OUTPUT: u32 = 3;
/// nft's datatype ids, concatenated 6 bits apart: only for `nft list` to show set keys.
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_INET_SERVICE: u32 = 13;

/// One expression of a rule.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Load a meta key (1 byte for nfproto and l4proto) into `dreg`.
    Meta {
        key: u32,
        dreg: u32,
    },
    /// Load `len` bytes at `offset` of a header into `dreg` (and the registers after it).
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// Go on only if the register holds these bytes.
    Eq {
        sreg: u32,
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`, over `mask.len()` bytes.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Go on only if the registers from `sreg` hold a key of the set (same batch: `set_id`).
    Lookup {
        set: String,
        set_id: u32,
        sreg: u32,
    },
    Drop,
    Accept,
}

/// A transaction: every message is applied, or none.
pub struct Batch {
    buf: Vec<u8>,
    /// Messages that ask for an acknowledgement, by sequence number from 1.
    acked: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            acked: 0,
        };
        let at = b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0);
        b.set_res_id(at);
        b.finish(at);
        b
    }

    fn set_res_id(&mut self, at: usize) {
        self.buf[at + 18..at + 20].copy_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    }

    fn header(&mut self, ty: u16, flags: u16, seq: u32, family: u8) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg: family, version 0, res_id.
        self.buf.extend_from_slice(&[family, 0, 0, 0]);
        at
    }

    fn finish(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Start an nf_tables message that the kernel acknowledges.
    fn msg(&mut self, ty: u16, flags: u16) -> usize {
        self.acked += 1;
        let seq = self.acked;
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            NFPROTO_INET,
        )
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        self.buf
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Batch)) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn value(&mut self, ty: u16, data: &[u8]) {
        self.nest(ty, |b| b.attr(NFTA_DATA_VALUE, data));
    }

    pub fn add_table(&mut self, name: &str) {
        self.table(name, NLM_F_CREATE)
    }

    /// A table that must not exist yet: the transaction fails (EEXIST) if it does.
    pub fn add_new_table(&mut self, name: &str) {
        self.table(name, NLM_F_CREATE | NLM_F_EXCL)
    }

    fn table(&mut self, name: &str, flags: u16) {
        let at = self.msg(NFT_MSG_NEWTABLE, flags);
        self.str(NFTA_TABLE_NAME, name);
        self.be32(NFTA_TABLE_FLAGS, 0);
        self.finish(at);
    }

    /// Delete a table and everything in it.
    pub fn delete_table(&mut self, name: &str) {
        let at = self.msg(NFT_MSG_DELTABLE, 0);
        self.str(NFTA_TABLE_NAME, name);
        self.finish(at);
    }

    /// A filter chain on `hook`, accepting by default.
    pub fn add_base_chain(&mut self, table: &str, name: &str, hook: u32, priority: i32) {
        let at = self.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        self.str(NFTA_CHAIN_TABLE, table);
        self.str(NFTA_CHAIN_NAME, name);
        self.nest(NFTA_CHAIN_HOOK, |b| {
            b.be32(NFTA_HOOK_HOOKNUM, hook);
            b.be32(NFTA_HOOK_PRIORITY, priority as u32);
        });
        self.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        self.str(NFTA_CHAIN_TYPE, "filter");
        self.finish(at);
    }

    /// A hash set of `key_len`-byte keys, known in this batch by `id`.
    pub fn add_set(&mut self, table: &str, name: &str, id: u32, key_type: u32, key_len: u32) {
        let at = self.msg(NFT_MSG_NEWSET, NLM_F_CREATE);
        self.str(NFTA_SET_TABLE, table);
        self.str(NFTA_SET_NAME, name);
        self.be32(NFTA_SET_FLAGS, 0);
        self.be32(NFTA_SET_KEY_TYPE, key_type);
        self.be32(NFTA_SET_KEY_LEN, key_len);
        self.be32(NFTA_SET_ID, id);
        self.finish(at);
    }

    /// Keys of a set made in this batch, a few hundred per message.
    pub fn add_set_keys(&mut self, table: &str, set: &str, id: u32, keys: &[Vec<u8>]) {
        for chunk in keys.chunks(256) {
            let at = self.msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE);
            self.str(NFTA_SET_ELEM_LIST_TABLE, table);
            self.str(NFTA_SET_ELEM_LIST_SET, set);
            self.be32(NFTA_SET_ELEM_LIST_SET_ID, id);
            self.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                for k in chunk {
                    b.nest(NFTA_LIST_ELEM, |b| b.value(NFTA_SET_ELEM_KEY, k));
                }
            });
            self.finish(at);
        }
    }

    /// Append a rule to a chain.
    pub fn add_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.rule(table, chain, exprs, NLM_F_APPEND)
    }

    /// Put a rule first in a chain.
    pub fn insert_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.rule(table, chain, exprs, 0)
    }

    fn rule(&mut self, table: &str, chain: &str, exprs: &[Expr], flags: u16) {
        let at = self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | flags);
        self.str(NFTA_RULE_TABLE, table);
        self.str(NFTA_RULE_CHAIN, chain);
        self.nest(NFTA_RULE_EXPRESSIONS, |b| {
            for e in exprs {
                b.nest(NFTA_LIST_ELEM, |b| b.expr(e));
            }
        });
        self.finish(at);
    }

    fn expr(&mut self, e: &Expr) {
        let name = match e {
            Expr::Meta { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Eq { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Lookup { .. } => "lookup",
            Expr::Drop | Expr::Accept => "immediate",
        };
        self.str(NFTA_EXPR_NAME, name);
        self.nest(NFTA_EXPR_DATA, |b| match e {
            Expr::Meta { key, dreg } => {
                b.be32(NFTA_META_DREG, *dreg);
                b.be32(NFTA_META_KEY, *key);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                b.be32(NFTA_PAYLOAD_DREG, *dreg);
                b.be32(NFTA_PAYLOAD_BASE, *base);
                b.be32(NFTA_PAYLOAD_OFFSET, *offset);
                b.be32(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Eq { sreg, data } => {
                b.be32(NFTA_CMP_SREG, *sreg);
                b.be32(NFTA_CMP_OP, 0);
                b.value(NFTA_CMP_DATA, data);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                b.be32(NFTA_BITWISE_SREG, *sreg);
                b.be32(NFTA_BITWISE_DREG, *dreg);
                b.be32(NFTA_BITWISE_LEN, mask.len() as u32);
                b.value(NFTA_BITWISE_MASK, mask);
                b.value(NFTA_BITWISE_XOR, xor);
            }
            Expr::Lookup { set, set_id, sreg } => {
                b.str(NFTA_LOOKUP_SET, set);
                b.be32(NFTA_LOOKUP_SREG, *sreg);
                b.be32(NFTA_LOOKUP_SET_ID, *set_id);
            }
            Expr::Drop | Expr::Accept => {
                let code = if matches!(e, Expr::Drop) {
                    NF_DROP
                } else {
                    NF_ACCEPT
                };
                b.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                b.nest(NFTA_IMMEDIATE_DATA, |b| {
                    b.nest(NFTA_DATA_VERDICT, |b| b.be32(NFTA_VERDICT_CODE, code))
                });
            }
        });
    }

    /// Send the transaction in the calling thread's network namespace and wait for the
    /// kernel's verdict on each message. The error names the first message refused.
    pub fn commit(self, what: &str) -> Result<()> {
        let nl = Socket::open(what)?;
        crate::timeline::mark(|| "nft: socket".into());
        self.commit_on(&nl, what)
    }

    /// Send the transaction on `nl`, in the network namespace it was opened in, and wait for
    /// the kernel's verdict on each message.
    pub fn commit_on(mut self, nl: &Socket, what: &str) -> Result<()> {
        let at = self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, 0);
        self.set_res_id(at);
        self.finish(at);
        let nl = &nl.0;
        // A large batch (thousands of connections) in one sendmsg.
        let size = (self.buf.len() + 65536) as i32;
        let _ = crate::net::set_int(nl, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size);
        let _ = crate::net::set_int(nl, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 1 << 20);
        crate::net::send_all(nl, &self.buf, 0)
            .map_err(|e| Error::Parse(format!("{what}: sending to nf_tables: {e}")))?;
        crate::timeline::mark(|| "nft: sent".into());
        let mut seen = 0u32;
        let mut first_err: Option<(u32, i32)> = None;
        let mut buf = vec![0u8; 64 << 10];
        while seen < self.acked {
            let n = recv_timeout(nl, &mut buf, 2000)
                .map_err(|e| Error::Parse(format!("{what}: waiting for nf_tables: {e}")))?;
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < 16 || off + len > n {
                    return Err(Error::Parse(format!(
                        "{what}: malformed netlink answer from nf_tables"
                    )));
                }
                if ty == NLMSG_ERROR && len >= 36 {
                    let e = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                    let seq = u32::from_ne_bytes(buf[off + 28..off + 32].try_into().unwrap());
                    seen += 1;
                    if e != 0 && first_err.is_none_or(|(s, _)| seq < s) {
                        first_err = Some((seq, e));
                    }
                }
                off += (len + 3) & !3;
            }
        }
        match first_err {
            None if seen >= self.acked => Ok(()),
            None => Err(Error::Parse(format!(
                "{what}: nf_tables answered {seen} of {} messages",
                self.acked
            ))),
            Some((seq, e)) => Err(Error::io(
                format!("{what} (nf_tables message {seq} of {})", self.acked),
                std::io::Error::from_raw_os_error(-e),
            )),
        }
    }
}

/// A netlink socket to nf_tables. It acts in the network namespace it was opened in, from
/// whichever thread uses it: opened ahead, it spares a later transaction entering the
/// namespace.
pub struct Socket(OwnedFd);

impl Socket {
    /// Open one in the calling thread's network namespace.
    pub fn open(what: &str) -> Result<Socket> {
        socket(what).map(Socket)
    }
}

fn socket(what: &str) -> Result<OwnedFd> {
    // SAFETY: socket takes integers and returns a new fd.
    let rc = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if rc < 0 {
        return Err(Error::io(
            format!("{what}: nf_tables netlink socket"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// Whether table `name` (inet) exists in the calling thread's network namespace. A plain
/// request, not a transaction: a failed transaction costs an RCU grace period (10-20 ms).
pub fn table_exists(name: &str) -> Result<bool> {
    let what = format!("looking up nftables table inet {name}");
    let mut b = Batch {
        buf: Vec::new(),
        acked: 0,
    };
    let at = b.msg(NFT_MSG_GETTABLE, 0);
    b.str(NFTA_TABLE_NAME, name);
    b.finish(at);
    let nl = socket(&what)?;
    crate::net::send_all(&nl, &b.buf, 0)?;
    let mut buf = vec![0u8; 8192];
    // The table, then an acknowledgement; or an error alone.
    let n = recv_timeout(&nl, &mut buf, 2000).map_err(|e| Error::io(what.clone(), e))?;
    if n < 20 {
        return Err(Error::Parse(format!("{what}: no answer from nf_tables")));
    }
    if u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Ok(true);
    }
    match i32::from_ne_bytes(buf[16..20].try_into().unwrap()) {
        0 => Ok(true),
        e if -e == libc::ENOENT => Ok(false),
        e => Err(Error::io(what, std::io::Error::from_raw_os_error(-e))),
    }
}

/// recv with a deadline: 0 when nothing came in time.
fn recv_timeout(fd: &OwnedFd, buf: &mut [u8], ms: i32) -> std::io::Result<usize> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let rc = loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        // A signal Ferry handles (Ctrl-C: `cancel`) must not fail the exchange.
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break rc;
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if rc == 0 {
        return Ok(0);
    }
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Delete table `name` (inet) in the calling thread's network namespace: false when there was
/// none.
pub fn delete_table(name: &str) -> Result<bool> {
    let mut b = Batch::new();
    b.delete_table(name);
    match b.commit(&format!("deleting nftables table inet {name}")) {
        Ok(()) => Ok(true),
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_sized() {
        let mut b = Batch::new();
        let start = b.buf.len();
        b.add_table("t");
        // header 20, name "t\0" padded to 8, flags 8.
        assert_eq!(b.buf.len() - start, 36);
        let at = b.buf.len();
        b.add_rule("t", "c", &[Expr::Drop]);
        let len = u32::from_ne_bytes(b.buf[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(len, b.buf.len() - at);
        assert_eq!(len % 4, 0);
        assert_eq!(b.acked, 2);
    }
}
