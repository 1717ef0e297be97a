//! Namespaces the dumped tree made for itself. The network namespace is chosen by the caller
//! at restore (`--netns`); UTS (with its host and domain names) and IPC namespaces are
//! recreated around the restored tree. A tree in a mount namespace of its own gets a new one,
//! a copy of the restorer's, into which the mounts the tree made (those its mount table has
//! and Ferry's has not) are recreated: tmpfs with its files, bind mounts, proc and sysfs
//! instances, and per-mount flags changed by a remount (read-only, nosuid, ...).

use crate::ctx::Target;
use crate::hexcodec::{hex, unhex};
use crate::schema::MappingImage;
use crate::{EngineError, Result};
use ferry_sys::mount::{self, MountInfo};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Namespaces {
    /// Host and domain name of the tree's own UTS namespace.
    #[serde(default)]
    pub uts: Option<(String, String)>,
    /// The tree had an IPC namespace of its own (System V objects are not carried).
    #[serde(default)]
    pub ipc: bool,
    /// The tree had a network namespace of its own (its inode, for the record).
    #[serde(default)]
    pub net: Option<u64>,
    /// The tree had a mount namespace of its own.
    #[serde(default)]
    pub mnt: bool,
    /// Its root mount propagated nothing (private, as `unshare --mount` makes it): the new
    /// namespace is made private too.
    #[serde(default)]
    pub mnt_private: bool,
    /// The mounts the tree made in it, parents first, recreated in that order.
    #[serde(default)]
    pub mounts: Vec<MountImage>,
}

impl Namespaces {
    /// Would `restore` make the same namespaces for both (the network namespace is the
    /// caller's choice, not made here)?
    pub fn made_alike(&self, other: &Namespaces) -> bool {
        self.uts == other.uts
            && self.ipc == other.ipc
            && self.mnt == other.mnt
            && self.mnt_private == other.mnt_private
            && self.mounts.is_empty()
            && other.mounts.is_empty()
    }
}

/// A mount the tree made in its own mount namespace (or a mount of Ferry's whose per-mount
/// flags it changed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountImage {
    /// The mount point, as the dumper saw it (from its own root).
    pub target: String,
    pub kind: MountKind,
    /// tmpfs, proc, sysfs: the source name mountinfo shows. Bind: the path mounted, as the
    /// dumper saw it; inside an earlier mount of the list when it came from one.
    #[serde(default)]
    pub source: String,
    /// Per-mount flags: MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOSYMFOLLOW and the
    /// atime mode (MS_NOATIME, MS_NODIRATIME, MS_RELATIME or MS_STRICTATIME).
    pub flags: u64,
    /// File system options (tmpfs `size=`, `mode=`, `nr_inodes=`...; proc `hidepid=`...).
    #[serde(default)]
    pub data: String,
    /// tmpfs: its superblock was read-only (`mount -o remount,ro`), not only this mount.
    #[serde(default)]
    pub sb_ro: bool,
    /// tmpfs: its files, parents before children; the first is its root directory.
    #[serde(default)]
    pub files: Vec<TmpfsFile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A new tmpfs, filled with the files it held.
    Tmpfs,
    /// A bind mount of `source`.
    Bind,
    /// A new proc instance.
    Proc,
    /// A new sysfs instance.
    Sysfs,
    /// A mount Ferry has too, with other per-mount flags: remounted with `flags`.
    Remount,
}

/// A file of a tmpfs the tree mounted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TmpfsFile {
    /// Relative to the mount point; empty for its root directory.
    pub path: String,
    pub kind: TmpfsKind,
    /// st_mode's permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds, nanoseconds.
    pub mtime: (i64, i64),
    /// File: its contents, hex. Symlink: its target, hex.
    #[serde(default)]
    pub data: String,
    /// Link: the path (relative to the mount point) of an earlier name of the same file.
    #[serde(default)]
    pub link: String,
    /// Character or block device: its device number.
    #[serde(default)]
    pub rdev: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TmpfsKind {
    Dir,
    File,
    Symlink,
    /// Another name (hard link) of a file listed before.
    Link,
    /// A FIFO (recreated empty: bytes in it travel with the fds open on it).
    Fifo,
    /// A Unix socket's file (recreated as a file no socket listens on; a socket of the tree
    /// bound there is refused).
    Socket,
    CharDevice,
    BlockDevice,
}

/// The most file bytes a dump carries for all the tmpfs mounts of a tree together.
pub const TMPFS_MAX: u64 = 16 << 20;

fn own(pid: i32, kind: &str) -> Result<Option<u64>> {
    let theirs = ferry_sys::net::ns_id(&format!("/proc/{pid}/ns/{kind}"))?;
    let ours = ferry_sys::net::ns_id(&format!("/proc/self/ns/{kind}"))?;
    Ok((theirs != ours).then_some(theirs.1))
}

/// Is process `pid` in another mount namespace than Ferry?
pub fn own_mntns(pid: i32) -> Result<bool> {
    Ok(own(pid, "mnt")?.is_some())
}

pub fn dump(pid: i32) -> Result<Namespaces> {
    let mut ns = Namespaces::default();
    if own(pid, "uts")?.is_some() {
        let read = |f: &str| {
            std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| ferry_sys::Error::Parse(format!("reading {f}: {e}")))
        };
        ns.uts = Some(ferry_sys::net::in_ns(
            &format!("/proc/{pid}/ns/uts"),
            libc::CLONE_NEWUTS,
            || {
                Ok((
                    read("/proc/sys/kernel/hostname")?,
                    read("/proc/sys/kernel/domainname")?,
                ))
            },
        )?);
    }
    ns.ipc = own(pid, "ipc")?.is_some();
    ns.net = own(pid, "net")?;
    ns.mnt = own(pid, "mnt")?.is_some();
    if ns.mnt {
        (ns.mnt_private, ns.mounts) = dump_mounts(pid)?;
    }
    Ok(ns)
}

/// `rel` of `path` below directory `dir` ("" for `dir` itself), on whole path components.
fn under<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    if dir == "/" {
        return path.strip_prefix('/');
    }
    match path.strip_prefix(dir)? {
        "" => Some(""),
        rest => rest.strip_prefix('/'),
    }
}

fn join(dir: &str, rel: &str) -> String {
    match (rel.is_empty(), dir.ends_with('/')) {
        (true, _) => dir.to_string(),
        (false, true) => format!("{dir}{rel}"),
        (false, false) => format!("{dir}/{rel}"),
    }
}

/// The mounts the tree of `pid` made in its own mount namespace: its mount table against
/// Ferry's. Returns whether its root mount is private, and the mounts to recreate.
fn dump_mounts(pid: i32) -> Result<(bool, Vec<MountImage>)> {
    let theirs = mount::read_mountinfo(&pid.to_string())?;
    let ours = mount::read_mountinfo("self")?;
    let refuse = |what: String| EngineError::Unsupported { pid, what };
    // Their mount points are from their root (a chroot), ours from ours.
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .map_err(|e| EngineError::Failed(format!("reading /proc/{pid}/root: {e}")))?
        .display()
        .to_string();
    let full = |mp: &str| match (root.as_str(), mp) {
        ("/", mp) => mp.to_string(),
        (r, "/") => r.to_string(),
        (r, mp) => format!("{r}{mp}"),
    };
    let mut used = vec![false; ours.len()];
    let mut private = true;
    // (their entry, what it becomes)
    let mut picked: Vec<(&MountInfo, MountImage)> = Vec::new();
    // File systems first mounted by the tree: dev -> mount point (as the dumper sees it).
    let mut fresh: Vec<(&str, String)> = Vec::new();
    for (i, m) in theirs.iter().enumerate() {
        // Namespace files (/run/netns/NAME) are not mounts the tree needs rebuilt, and the
        // namespaces they hold may be gone.
        if m.fstype == "nsfs" {
            continue;
        }
        let target = full(&m.mount_point);
        if m.mount_point == "/" {
            if theirs[i + 1..].iter().any(|l| l.mount_point == "/") {
                // Under the root mounted over it: out of reach.
                continue;
            }
            private = !m.propagates();
            let our_root = ours.iter().rev().find(|o| o.mount_point == "/");
            let same = if root == "/" {
                our_root.is_some_and(|o| o.dev == m.dev && o.root == m.root)
            } else {
                ours.iter().any(|o| o.dev == m.dev)
            };
            if same && root == "/" && our_root.is_some_and(|o| o.flags() != m.flags()) {
                // Its root remounted (read-only, say).
                picked.push((m, mount_image("/", MountKind::Remount, "", m)));
            }
            if !same {
                return Err(refuse(format!(
                    "its mount namespace has another root file system ({} {} of device {}, \
                     root {}) than Ferry's (pivot_root), which this version cannot carry",
                    m.fstype, m.source, m.dev, m.root
                )));
            }
            continue;
        }
        if let Some(o) = ours.iter().enumerate().position(|(j, o)| {
            !used[j] && o.mount_point == target && o.dev == m.dev && o.root == m.root
        }) {
            used[o] = true;
            if ours[o].flags() != m.flags() {
                picked.push((m, mount_image(&target, MountKind::Remount, "", m)));
            }
            continue;
        }
        // Mounted over later (at the same place or above): what it holds cannot be seen.
        let covered = theirs[i + 1..]
            .iter()
            .find(|l| l.mount_point != "/" && under(&m.mount_point, &l.mount_point).is_some());
        let kind;
        let source;
        if let Some((o, rel)) = ours
            .iter()
            .filter(|o| o.dev == m.dev && o.fstype != "nsfs")
            .filter_map(|o| under(&m.root, &o.root).map(|rel| (o, rel)))
            .max_by_key(|(o, _)| o.root.len())
        {
            kind = MountKind::Bind;
            source = join(&o.mount_point, rel);
            if std::fs::symlink_metadata(&source).is_err() {
                return Err(refuse(format!(
                    "its mount namespace has a bind mount of {source} on {target}, and {source} \
                     does not exist (any more) in Ferry's"
                )));
            }
        } else if let Some((_, mp)) = fresh.iter().find(|(d, _)| *d == m.dev) {
            let rel = under(&m.root, "/").unwrap_or("");
            kind = MountKind::Bind;
            source = join(mp, rel);
        } else if m.root != "/" {
            return Err(refuse(format!(
                "its mount namespace has a bind mount on {target} of {} in a {} file system \
                 ({}) that is mounted nowhere else, which this version cannot carry",
                m.root, m.fstype, m.source
            )));
        } else {
            kind = match m.fstype.as_str() {
                "tmpfs" => MountKind::Tmpfs,
                "proc" => MountKind::Proc,
                "sysfs" => MountKind::Sysfs,
                other => {
                    return Err(refuse(format!(
                        "its mount namespace has a mount of type {other} on {target} (source \
                         {}), which this version cannot carry (it carries tmpfs, proc and sysfs \
                         mounts, bind mounts and remounts)",
                        m.source
                    )))
                }
            };
            source = m.source.clone();
            fresh.push((&m.dev, target.clone()));
        }
        if let (MountKind::Tmpfs, Some(l)) = (kind, covered) {
            return Err(refuse(format!(
                "the tmpfs on {target} in its mount namespace is covered by the later mount on \
                 {}, so its files cannot be read",
                full(&l.mount_point)
            )));
        }
        picked.push((m, mount_image(&target, kind, &source, m)));
    }
    // Parents first; otherwise in mountinfo order (the order they were made).
    let mut order = Vec::with_capacity(picked.len());
    let mut left: Vec<(&MountInfo, MountImage)> = picked;
    while !left.is_empty() {
        let i = left
            .iter()
            .position(|(m, _)| !left.iter().any(|(p, _)| p.id == m.parent))
            .unwrap_or(0);
        order.push(left.remove(i));
    }
    let mut budget = TMPFS_MAX;
    let mut out = Vec::new();
    for (m, mut img) in order {
        if img.kind == MountKind::Tmpfs {
            let at = format!("/proc/{pid}/root{}", m.mount_point);
            img.files = read_tmpfs(pid, &at, &img.target, &mut budget)?;
        }
        out.push(img);
    }
    Ok((private, out))
}

fn mount_image(target: &str, kind: MountKind, source: &str, m: &MountInfo) -> MountImage {
    let data: Vec<&str> = m
        .super_options
        .iter()
        .map(String::as_str)
        .filter(|o| *o != "rw" && *o != "ro")
        .collect();
    MountImage {
        target: target.to_string(),
        kind,
        source: source.to_string(),
        flags: m.flags(),
        data: match kind {
            MountKind::Tmpfs | MountKind::Proc | MountKind::Sysfs => data.join(","),
            _ => String::new(),
        },
        sb_ro: kind == MountKind::Tmpfs && m.super_options.iter().any(|o| o == "ro"),
        files: Vec::new(),
    }
}

/// The files of the tmpfs mounted at `at` (a /proc/PID/root path), within `budget` bytes.
/// Mount points of other mounts inside it are kept as empty directories or files.
fn read_tmpfs(pid: i32, at: &str, target: &str, budget: &mut u64) -> Result<Vec<TmpfsFile>> {
    let io = |p: &str, e: std::io::Error| {
        EngineError::Failed(format!(
            "process {pid}: reading {p} of the tmpfs on {target} in its mount namespace: {e}"
        ))
    };
    let entry = |rel: &str, m: &std::fs::Metadata, kind: TmpfsKind| TmpfsFile {
        path: rel.to_string(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        data: String::new(),
        link: String::new(),
        rdev: 0,
    };
    let top = std::fs::symlink_metadata(at).map_err(|e| io("its root", e))?;
    let dev = top.dev();
    let mut out = vec![entry("", &top, TmpfsKind::Dir)];
    let mut inodes: std::collections::HashMap<u64, String> = Default::default();
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let path = join(at, &dir);
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .map_err(|e| io(&join("/", &dir), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let rel = join(&dir, &name).trim_start_matches('/').to_string();
            let p = join(at, &rel);
            let m = std::fs::symlink_metadata(&p).map_err(|e| io(&rel, e))?;
            let ft = m.file_type();
            if m.dev() != dev {
                // Another mount's mount point: recreated empty, that mount comes later.
                let kind = if ft.is_dir() {
                    TmpfsKind::Dir
                } else {
                    TmpfsKind::File
                };
                out.push(entry(&rel, &m, kind));
                continue;
            }
            if ft.is_dir() {
                out.push(entry(&rel, &m, TmpfsKind::Dir));
                dirs.push(rel);
            } else if ft.is_symlink() {
                let to = std::fs::read_link(&p).map_err(|e| io(&rel, e))?;
                let mut e = entry(&rel, &m, TmpfsKind::Symlink);
                use std::os::unix::ffi::OsStrExt;
                e.data = hex(to.as_os_str().as_bytes());
                out.push(e);
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = inodes.get(&m.ino()) {
                        let mut e = entry(&rel, &m, TmpfsKind::Link);
                        e.link = first.clone();
                        out.push(e);
                        continue;
                    }
                    inodes.insert(m.ino(), rel.clone());
                }
                if m.len() > *budget {
                    return Err(EngineError::Unsupported {
                        pid,
                        what: format!(
                            "the tmpfs on {target} in its mount namespace holds more file data \
                             than a dump carries ({} MiB for all its tmpfs mounts together; \
                             {rel} alone has {} bytes)",
                            TMPFS_MAX >> 20,
                            m.len()
                        ),
                    });
                }
                let data = std::fs::read(&p).map_err(|e| io(&rel, e))?;
                *budget = budget.saturating_sub(data.len() as u64);
                let mut e = entry(&rel, &m, TmpfsKind::File);
                e.data = hex(&data);
                out.push(e);
            } else {
                use std::os::unix::fs::FileTypeExt;
                let kind = if ft.is_fifo() {
                    TmpfsKind::Fifo
                } else if ft.is_socket() {
                    TmpfsKind::Socket
                } else if ft.is_char_device() {
                    TmpfsKind::CharDevice
                } else {
                    TmpfsKind::BlockDevice
                };
                let mut e = entry(&rel, &m, kind);
                e.rdev = m.rdev();
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// In the root stub, before it forks anything: new UTS and IPC namespaces as saved, and a
/// mount namespace of its own (a copy of Ferry's, made private like the tree's was, with the
/// mounts the tree made recreated in it) when it had one.
pub fn restore(t: &mut Target, ns: &Namespaces) -> Result<()> {
    let mut flags = 0;
    if ns.mnt {
        flags |= libc::CLONE_NEWNS;
    }
    if ns.uts.is_some() {
        flags |= libc::CLONE_NEWUTS;
    }
    if ns.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if flags == 0 {
        return Ok(());
    }
    t.sys(
        "unshare of UTS/IPC/mount namespaces",
        libc::SYS_unshare,
        [flags as u64, 0, 0, 0, 0, 0],
    )?;
    if ns.mnt && (ns.mnt_private || !ns.mounts.is_empty()) {
        // Done from a thread of ours that joins the stub's new namespace.
        mount::in_mntns(t.pid, || restore_mounts(ns))?;
    }
    if let Some((host, domain)) = &ns.uts {
        for (name, nr, what) in [
            (host, libc::SYS_sethostname, "sethostname"),
            (domain, libc::SYS_setdomainname, "setdomainname"),
        ] {
            if name.len() > 64 {
                return Err(EngineError::Failed(format!(
                    "{what}: name too long: {name}"
                )));
            }
            let at = t.put_path(name)?;
            t.sys(what, nr, [at, name.len() as u64, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}

const MS_REMOUNT_BIND: u64 = libc::MS_REMOUNT | libc::MS_BIND;

/// In the new mount namespace: no propagation to or from Ferry's (so nothing made here shows
/// outside), then every saved mount, parents first.
fn restore_mounts(ns: &Namespaces) -> Result<()> {
    mount::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    for m in &ns.mounts {
        let what = |e: ferry_sys::Error| {
            EngineError::Failed(format!(
                "recreating the {} mount on {} of the tree's mount namespace: {e}",
                kind_name(m.kind),
                m.target
            ))
        };
        let data = Some(m.data.as_str()).filter(|d| !d.is_empty());
        match m.kind {
            MountKind::Tmpfs => {
                let rw = m.flags & !libc::MS_RDONLY;
                mount::mount(Some(&m.source), &m.target, Some("tmpfs"), rw, data).map_err(what)?;
                fill_tmpfs(&m.target, &m.files)?;
                mount::mount(None, &m.target, None, MS_REMOUNT_BIND | m.flags, None)
                    .map_err(what)?;
                if m.sb_ro {
                    let f = libc::MS_REMOUNT | libc::MS_RDONLY;
                    mount::mount(None, &m.target, None, f, data).map_err(what)?;
                }
            }
            MountKind::Proc | MountKind::Sysfs => {
                let ty = kind_name(m.kind);
                mount::mount(Some(&m.source), &m.target, Some(ty), m.flags, data).map_err(what)?;
            }
            MountKind::Bind => {
                let f = libc::MS_BIND;
                mount::mount(Some(&m.source), &m.target, None, f, None).map_err(what)?;
                mount::mount(None, &m.target, None, MS_REMOUNT_BIND | m.flags, None)
                    .map_err(what)?;
            }
            MountKind::Remount => {
                mount::mount(None, &m.target, None, MS_REMOUNT_BIND | m.flags, None)
                    .map_err(what)?;
            }
        }
    }
    Ok(())
}

impl MountKind {
    /// As the image writes it.
    pub fn name(self) -> &'static str {
        match self {
            MountKind::Remount => "remount",
            k => kind_name(k),
        }
    }
}

fn kind_name(k: MountKind) -> &'static str {
    match k {
        MountKind::Tmpfs => "tmpfs",
        MountKind::Bind => "bind",
        MountKind::Proc => "proc",
        MountKind::Sysfs => "sysfs",
        MountKind::Remount => "remounted",
    }
}

/// Recreate a tmpfs's files under `target`: contents, owners, modes, then modification
/// times (children before their directories, which creating the children touched).
fn fill_tmpfs(target: &str, files: &[TmpfsFile]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        let p = join(target, &f.path);
        let fail = |e: std::io::Error| {
            EngineError::Failed(format!(
                "recreating {p} in the tmpfs on {target} of the tree's mount namespace: {e}"
            ))
        };
        match f.kind {
            TmpfsKind::Dir if f.path.is_empty() => {}
            TmpfsKind::Dir => std::fs::create_dir(&p).map_err(fail)?,
            TmpfsKind::File => {
                let data = unhex(&f.data, "tmpfs file")?;
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .and_then(|mut w| w.write_all(&data))
                    .map_err(fail)?;
            }
            TmpfsKind::Symlink => {
                use std::os::unix::ffi::OsStrExt;
                let to = unhex(&f.data, "tmpfs symlink")?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&to), &p).map_err(fail)?;
            }
            TmpfsKind::Link => {
                std::fs::hard_link(join(target, &f.link), &p).map_err(fail)?;
                continue;
            }
            TmpfsKind::Fifo
            | TmpfsKind::Socket
            | TmpfsKind::CharDevice
            | TmpfsKind::BlockDevice => {
                use nix::sys::stat::{Mode, SFlag};
                let ty = match f.kind {
                    TmpfsKind::Fifo => SFlag::S_IFIFO,
                    TmpfsKind::Socket => SFlag::S_IFSOCK,
                    TmpfsKind::CharDevice => SFlag::S_IFCHR,
                    _ => SFlag::S_IFBLK,
                };
                nix::sys::stat::mknod(p.as_str(), ty, Mode::empty(), f.rdev as libc::dev_t)
                    .map_err(|e| fail(e.into()))?;
            }
        }
        std::os::unix::fs::lchown(&p, Some(f.uid), Some(f.gid)).map_err(fail)?;
        if f.kind != TmpfsKind::Symlink {
            // After chown, which clears set-user-ID and set-group-ID bits (mknod made the
            // special files with no permission at all).
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).map_err(fail)?;
        }
    }
    for f in files.iter().rev().filter(|f| f.kind != TmpfsKind::Link) {
        let p = join(target, &f.path);
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let mtime = TimeSpec::new(f.mtime.0, f.mtime.1.clamp(0, 999_999_999));
        utimensat(
            nix::fcntl::AT_FDCWD,
            p.as_str(),
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| {
            EngineError::Failed(format!(
                "setting the time of {p} in the tmpfs on {target}: {e}"
            ))
        })?;
    }
    Ok(())
}

/// The paths of an image as Ferry can check them before the tree's mounts exist: a path on a
/// bind mount the tree made is found at its source; one on a tmpfs, proc or sysfs the restore
/// recreates is not checked (`None`).
pub struct MountView<'a> {
    mounts: &'a [MountImage],
}

impl<'a> MountView<'a> {
    pub fn new(ns: &'a Namespaces) -> MountView<'a> {
        MountView {
            mounts: if ns.mnt { &ns.mounts } else { &[] },
        }
    }

    /// Where `path` is now, or None when the restore makes it.
    pub fn host_path(&self, path: &str) -> Option<String> {
        host_path_in(self.mounts, path)
    }

    /// File mappings with the paths to check now (those the restore makes are left out).
    pub fn mappings(&self, maps: &[MappingImage]) -> Vec<MappingImage> {
        maps.iter()
            .filter_map(|m| match (&m.path, m.ghost) {
                (Some(p), None) if m.kind == crate::schema::MapKind::File => {
                    let mut m = m.clone();
                    m.path = Some(self.host_path(p)?);
                    Some(m)
                }
                _ => Some(m.clone()),
            })
            .collect()
    }

    /// Before any process exists: every mount point and bind source must be there (or be
    /// made by an earlier mount of the list), and every remounted mount must be a mount here.
    pub fn check(&self) -> Result<()> {
        let ours = if self.mounts.iter().any(|m| m.kind == MountKind::Remount) {
            mount::read_mountinfo("self")?
        } else {
            Vec::new()
        };
        for (i, m) in self.mounts.iter().enumerate() {
            let before = &self.mounts[..i];
            let gone = |p: &str, what: &str| {
                host_path_in(before, p)
                    .filter(|h| std::fs::symlink_metadata(h).is_err())
                    .map(|h| {
                        EngineError::Failed(format!(
                            "the tree's {} mount on {}: {what} {h} does not exist here",
                            kind_name(m.kind),
                            m.target
                        ))
                    })
            };
            if m.kind == MountKind::Remount {
                if !ours.iter().any(|o| o.mount_point == m.target) {
                    return Err(EngineError::Failed(format!(
                        "the tree remounted {} with other flags, and {} is not a mount point here",
                        m.target, m.target
                    )));
                }
                continue;
            }
            if let Some(e) = gone(&m.target, "its mount point") {
                return Err(e);
            }
            if m.kind == MountKind::Bind {
                if let Some(e) = gone(&m.source, "its source") {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

fn host_path_in(mounts: &[MountImage], path: &str) -> Option<String> {
    let mut path = path.to_string();
    let mut upto = mounts.len();
    loop {
        // The last mount made over the path decides where it lies.
        let hit = mounts[..upto]
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, m)| m.kind != MountKind::Remount)
            .find_map(|(i, m)| under(&path, &m.target).map(|rel| (i, m, rel.to_string())));
        match hit {
            None => return Some(path),
            Some((i, m, rel)) if m.kind == MountKind::Bind => {
                // Its source existed before it was mounted.
                path = join(&m.source, &rel);
                upto = i;
            }
            Some(_) => return None,
        }
    }
}

/// Unix sockets and the files in flight in their queues are rebuilt by Ferry before the
/// tree's mount namespace exists: refuse those whose paths lie on a mount the tree made.
pub fn check_paths<'a>(
    ns: &Namespaces,
    imgs: impl IntoIterator<Item = &'a crate::schema::ProcessImage>,
) -> Result<()> {
    let on_mount = |p: &str| {
        ns.mounts
            .iter()
            .rev()
            .filter(|m| m.kind != MountKind::Remount)
            .find(|m| under(p, &m.target).is_some())
    };
    for img in imgs {
        for s in img.sockets.iter().filter(|s| s.family == libc::AF_UNIX) {
            let at = img
                .fds
                .iter()
                .find(|f| f.socket == Some(s.inode))
                .map(|f| format!("fd {}", f.fd))
                .unwrap_or_else(|| "a socket in flight".into());
            let refuse = |what: String, m: &MountImage| EngineError::Unsupported {
                pid: img.pid,
                what: format!(
                    "{at} (socket:[{}]): {what} lies on the {} mount the tree made on {} in its \
                     mount namespace; sockets and the files in flight in their queues are \
                     rebuilt before those mounts exist, which this version cannot do",
                    s.inode,
                    kind_name(m.kind),
                    m.target
                ),
            };
            let name = unhex(&s.local, "Unix socket name")?;
            if name.first().is_some_and(|&c| c != 0) {
                let path = String::from_utf8_lossy(&name).into_owned();
                if let Some(m) = on_mount(&path) {
                    return Err(refuse(format!("its name {path}"), m));
                }
            }
            for f in s.queue_fds.iter().flatten().filter(|f| !f.path.is_empty()) {
                if let Some(m) = on_mount(&f.path) {
                    return Err(refuse(format!("the file {} in flight in it", f.path), m));
                }
            }
        }
    }
    Ok(())
}

/// Every member of the tree must share the root's namespaces: one set is carried.
pub fn check_tree(pids: &[i32]) -> Result<()> {
    for &p in &pids[1..] {
        for kind in ["uts", "ipc", "net", "mnt", "pid", "user"] {
            let a = ferry_sys::net::ns_id(&format!("/proc/{}/ns/{kind}", pids[0]))?;
            let b = ferry_sys::net::ns_id(&format!("/proc/{p}/ns/{kind}"))?;
            if a != b {
                return Err(EngineError::Unsupported {
                    pid: p,
                    what: format!(
                        "it is in another {kind} namespace than the root of the tree {}; \
                         this version carries one set of namespaces per tree",
                        pids[0]
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `--netns new:NAME`: a fresh, named network namespace (/run/netns/NAME) for a restore, with
/// loopback up holding every address the tree's IP sockets are bound to (as host routes),
/// so that they bind; the caller wires it to the world (veth, routes). Returns its
/// path. Fails if the name is taken.
pub fn fresh_netns(name: &str, imgs: &[crate::schema::ProcessImage]) -> Result<String> {
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| EngineError::Failed(format!("running ip (install iproute2): {e}")))?;
        if !out.status.success() {
            return Err(EngineError::Failed(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    if name.is_empty() || name.contains('/') {
        return Err(EngineError::Failed(format!("bad namespace name {name:?}")));
    }
    ip(&["netns", "add", name])?;
    let r = (|| -> Result<()> {
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        let mut addrs: Vec<std::net::IpAddr> = imgs
            .iter()
            .flat_map(|i| i.sockets.iter())
            .filter(|s| s.family == libc::AF_INET || s.family == libc::AF_INET6)
            .filter_map(|s| s.local.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .map(|ip| match ip {
                std::net::IpAddr::V6(v) => {
                    v.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip)
                }
                v => v,
            })
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Ok(());
        }
        for a in addrs {
            let cidr = match a {
                std::net::IpAddr::V4(v) => format!("{v}/32"),
                std::net::IpAddr::V6(v) => format!("{v}/128"),
            };
            let mut args = vec!["-n", name, "addr", "add", cidr.as_str(), "dev", "lo"];
            if a.is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = ip(&["netns", "del", name]);
        return Err(e);
    }
    Ok(format!("/run/netns/{name}"))
}
