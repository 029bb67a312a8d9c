//! What the host spends on an instance, read from /proc: its process tree, the CPU time
//! of that tree, and the memory it holds (PSS, so pages shared between instances are
//! split between them).

use std::fs;
use std::path::Path;

/// The process `root` and all its descendants (those alive now).
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(stat) = Stat::read(pid) {
                parents.push((pid, stat.ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// The fields of /proc/PID/stat the bench uses (times in clock ticks).
#[derive(Debug, PartialEq)]
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Self> {
        Self::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Parses the text of /proc/PID/stat (the command name, in parentheses, may hold
    /// spaces and parentheses: fields start after the last ')').
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some(Self {
            ppid: u32::try_from(num(1)?).ok()?,
            utime: num(11)?,
            stime: num(12)?,
            cutime: num(13)?,
            cstime: num(14)?,
        })
    }
}

/// Whether `pid_text` names a process other than this one that no longer exists (whose
/// leftovers may go).
pub fn gone(pid_text: &str) -> bool {
    pid_text
        .parse::<u32>()
        .is_ok_and(|pid| pid != std::process::id() && !alive(pid))
}

/// CPU time (user + system, ms) of `pids` and of the children they have reaped: what
/// the instance's processes have spent since they started. A process's own time is the
/// nanosecond run time of its live threads (schedstat), unless the clock-tick count,
/// which also holds threads that have exited, is larger.
pub fn cpu_ms(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let tick_ms = |t: u64| t as f64 * 1000.0 / hz;
    pids.iter()
        .filter_map(|p| Some((*p, Stat::read(*p)?)))
        .map(|(p, s)| {
            tick_ms(s.utime + s.stime).max(threads_run_ms(p)) + tick_ms(s.cutime + s.cstime)
        })
        .sum()
}

/// The run time of `pid`'s live threads, ms, from /proc/PID/task/*/schedstat.
fn threads_run_ms(pid: u32) -> f64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = dir
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

/// One mapping of /proc/PID/smaps: its size, its path (empty when anonymous) and the
/// PSS it holds.
#[derive(Debug, PartialEq)]
pub struct Mapping {
    /// Length in bytes.
    pub size: u64,
    /// The backing file, or `[heap]` and the like; empty for anonymous memory.
    pub path: String,
    /// Proportional set size, KiB.
    pub pss_kib: u64,
}

/// Parses the text of /proc/PID/smaps.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                // perms, offset, dev, inode, then the path (which may hold spaces).
                let path = words.skip(4).collect::<Vec<_>>().join(" ");
                out.push(Mapping {
                    size: end.saturating_sub(start),
                    path,
                    pss_kib: 0,
                });
                continue;
            }
        }
        if first == "Pss:" {
            if let (Some(m), Some(kib)) = (out.last_mut(), words.next()) {
                m.pss_kib += kib.parse::<u64>().unwrap_or(0);
            }
        }
    }
    out
}

/// The mappings of process `pid` (empty if it is gone).
pub fn smaps(pid: u32) -> Vec<Mapping> {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map(|t| parse_smaps(&t))
        .unwrap_or_default()
}

/// PSS (KiB) of the whole process `pid`, from smaps_rollup.
pub fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS (KiB) a VMM process holds in guest RAM: anonymous mappings exactly `ram_bytes`
/// long (how wisp, QEMU and Firecracker map a guest of less than 3 GiB), or the private
/// mapping of a restored snapshot's memory file.
pub fn guest_ram_pss_kib(pid: u32, ram_bytes: u64, memory_file: Option<&Path>) -> u64 {
    let file = memory_file.map(|p| p.to_string_lossy().into_owned());
    smaps(pid)
        .iter()
        .filter(|m| {
            (m.path.is_empty() && m.size == ram_bytes) || file.as_deref() == Some(m.path.as_str())
        })
        .map(|m| m.pss_kib)
        .sum()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let rest = &t[t.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_other_dead_processes_are_gone() {
        assert!(!gone(&std::process::id().to_string()));
        assert!(!gone("1"));
        assert!(!gone("not-a-pid"));
        assert!(gone("4194305"), "above the largest pid Linux hands out");
    }

    #[test]
    fn stat_with_a_tricky_command_name() {
        let text = "42 (a (b) c) S 7 42 42 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 1 0 5 0 0";
        assert_eq!(
            Stat::parse(text),
            Some(Stat {
                ppid: 7,
                utime: 11,
                stime: 22,
                cutime: 33,
                cstime: 44
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn smaps_mappings_and_their_pss() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/wisp
Size:                328 kB
Pss:                 100 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Pss:               20480 kB
7f0020000000-7f0020001000 rw-p 00000000 08:02 9 /tmp/snap dir/memory
Pss:                   4 kB
";
        let m = parse_smaps(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/wisp");
        assert_eq!(
            (m[1].size, m[1].path.as_str(), m[1].pss_kib),
            (256 << 20, "", 20480)
        );
        assert_eq!(m[2].path, "/tmp/snap dir/memory");
    }

    #[test]
    fn this_process_is_seen() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(pss_kib(me) > 0);
        assert!(tree(me).contains(&me));
        assert!(cpu_ms(&[me]) >= 0.0);
        assert!(!smaps(me).is_empty());
    }
}
