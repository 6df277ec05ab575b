//! Where the bridge runs on root Linux: the whole process (and the backends it spawns) with
//! `--cpus`, the ring thread alone with `--ring-cpu`.
//!
//! hvisor wakes the bridge with an interrupt that root Linux takes on one CPU (the GIC routes
//! the hvisor_virtio_device SPI to a single target). A ring thread that sleeps on another CPU
//! needs a second hop, a rescheduling IPI, for every wakeup; and every request that goes to a
//! backend and back (kick, completion, call) crosses CPUs twice more when the backend runs
//! elsewhere. `irq` finds that CPU from `/proc/interrupts` and `/proc/irq/<n>/`.

use std::fs;
use std::io;
use std::str::FromStr;

/// Where the bridge process runs, and with it every thread it starts and every backend it
/// spawns (they inherit its CPU set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessCpus {
    /// The CPU that takes hvisor's virtio interrupt: every hop of a request on one CPU.
    HvisorIrq,
    /// Wherever the scheduler puts each thread (no pinning).
    All,
    /// These CPUs.
    List(Vec<usize>),
}

impl FromStr for ProcessCpus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "irq" => Ok(ProcessCpus::HvisorIrq),
            "all" => Ok(ProcessCpus::All),
            list => parse_cpu_list(list).map(ProcessCpus::List).ok_or_else(|| {
                format!("{s:?} is neither a CPU list (such as 0 or 1,2-3), \"irq\" nor \"all\"")
            }),
        }
    }
}

/// A CPU list such as `0`, `2-3` or `1,4-5`, in order and without repeats; None when it is
/// malformed or empty.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (first, last): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let cpu = part.trim().parse().ok()?;
                (cpu, cpu)
            }
        };
        if first > last || last >= libc::CPU_SETSIZE as usize {
            return None;
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// Where the ring thread runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingCpu {
    /// This CPU.
    Cpu(usize),
    /// The CPU that takes hvisor's virtio interrupt.
    HvisorIrq,
}

impl FromStr for RingCpu {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "irq" {
            return Ok(RingCpu::HvisorIrq);
        }
        s.parse()
            .map(RingCpu::Cpu)
            .map_err(|_| format!("{s:?} is neither a CPU number nor \"irq\""))
    }
}

/// Why the ring thread could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// No line of `/proc/interrupts` names hvisor's virtio interrupt.
    #[error("no hvisor interrupt in /proc/interrupts (is hvisor.ko loaded?)")]
    NoHvisorIrq,
    /// A procfs file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interrupt's affinity list names no CPU.
    #[error("{path} names no CPU: {text:?}")]
    NoCpu {
        /// The file.
        path: String,
        /// What it held.
        text: String,
    },
    /// The CPU number does not fit the kernel's CPU set.
    #[error("CPU {0} is out of range")]
    OutOfRange(usize),
    /// sched_setaffinity failed (a CPU that is offline or outside the cpuset).
    #[error("cannot run on CPUs {cpus:?}")]
    SetAffinity {
        /// The CPUs.
        cpus: Vec<usize>,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Pins the calling thread, and so every thread and process it starts from now on, to `cpus`;
/// returns the CPUs, or None for [`ProcessCpus::All`]. Call it before any other thread starts:
/// threads already running keep their CPUs.
pub fn pin_process(cpus: &ProcessCpus) -> Result<Option<Vec<usize>>, AffinityError> {
    let cpus = match cpus {
        ProcessCpus::All => return Ok(None),
        ProcessCpus::HvisorIrq => vec![hvisor_irq_cpu()?],
        ProcessCpus::List(list) => list.clone(),
    };
    set_affinity(&cpus)?;
    Ok(Some(cpus))
}

/// Pins the calling thread (only it: threads already started keep their CPUs) to `target`;
/// returns the CPU.
pub fn pin_current_thread(target: RingCpu) -> Result<usize, AffinityError> {
    let cpu = match target {
        RingCpu::Cpu(cpu) => cpu,
        RingCpu::HvisorIrq => hvisor_irq_cpu()?,
    };
    set_affinity(&[cpu])?;
    Ok(cpu)
}

/// Restricts the calling thread to `cpus`.
fn set_affinity(cpus: &[usize]) -> Result<(), AffinityError> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // cpu_set_t holds CPU_SETSIZE bits; CPU_SET past it would write out of bounds.
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(AffinityError::OutOfRange(cpu));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        return Err(AffinityError::SetAffinity {
            cpus: cpus.to_vec(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The first CPU that takes hvisor's virtio interrupt.
fn hvisor_irq_cpu() -> Result<usize, AffinityError> {
    let interrupts = read("/proc/interrupts")?;
    let irq = hvisor_irq(&interrupts).ok_or(AffinityError::NoHvisorIrq)?;
    // effective_affinity_list is where the interrupt is delivered; older kernels only have
    // the requested smp_affinity_list.
    let mut last_error = None;
    for name in ["effective_affinity_list", "smp_affinity_list"] {
        let path = format!("/proc/irq/{irq}/{name}");
        match read(&path) {
            Ok(text) => {
                return first_cpu(&text).ok_or(AffinityError::NoCpu { path, text });
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or(AffinityError::NoHvisorIrq))
}

fn read(path: &str) -> Result<String, AffinityError> {
    fs::read_to_string(path).map_err(|source| AffinityError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The Linux IRQ number of the `/proc/interrupts` line that names hvisor's device
/// (`hvisor_virtio_device` in hvisor-tool's module).
fn hvisor_irq(interrupts: &str) -> Option<u32> {
    interrupts.lines().find_map(|line| {
        let (number, rest) = line.trim_start().split_once(':')?;
        rest.split_whitespace()
            .last()
            .is_some_and(|name| name.starts_with("hvisor"))
            .then(|| number.parse().ok())
            .flatten()
    })
}

/// The first CPU of a CPU list such as `0`, `2-3` or `1,4-5`.
fn first_cpu(list: &str) -> Option<usize> {
    let first = list.trim().split(',').next()?;
    first.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPTS: &str = "           CPU0       CPU1
 11:        980        789     GICv3  27 Level     arch_timer
 14:          1          0     GICv3  79 Edge      virtio0
 15:          0          0     GICv3  64 Edge      hvisor_virtio_device
IPI0:        12         30       Rescheduling interrupts
";

    #[test]
    fn the_hvisor_interrupt_is_found_by_name() {
        assert_eq!(hvisor_irq(INTERRUPTS), Some(15));
        assert_eq!(
            hvisor_irq(&INTERRUPTS.replace("hvisor_virtio_device", "x")),
            None
        );
        assert_eq!(hvisor_irq(""), None);
    }

    #[test]
    fn cpu_lists_give_their_first_cpu() {
        assert_eq!(first_cpu("0\n"), Some(0));
        assert_eq!(first_cpu("2-3"), Some(2));
        assert_eq!(first_cpu("1,4-5"), Some(1));
        assert_eq!(first_cpu(""), None);
        assert_eq!(first_cpu("x"), None);
    }

    #[test]
    fn ring_cpu_parses() {
        assert_eq!("irq".parse(), Ok(RingCpu::HvisorIrq));
        assert_eq!("3".parse(), Ok(RingCpu::Cpu(3)));
        assert!("-1".parse::<RingCpu>().is_err());
        assert!("cpu0".parse::<RingCpu>().is_err());
    }

    #[test]
    fn process_cpus_parse() {
        assert_eq!("irq".parse(), Ok(ProcessCpus::HvisorIrq));
        assert_eq!("all".parse(), Ok(ProcessCpus::All));
        assert_eq!("1".parse(), Ok(ProcessCpus::List(vec![1])));
        assert_eq!("3,0-1,1".parse(), Ok(ProcessCpus::List(vec![0, 1, 3])));
        for bad in ["", "x", "2-1", "1,", "-1", "0-99999"] {
            assert!(bad.parse::<ProcessCpus>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pinned_process_starts_its_threads_and_children_on_its_cpus() {
        std::thread::spawn(|| {
            assert_eq!(
                pin_process(&ProcessCpus::List(vec![0])).unwrap(),
                Some(vec![0])
            );
            // A thread started afterwards inherits the set.
            std::thread::spawn(|| {
                // SAFETY: sched_getcpu has no preconditions.
                assert_eq!(unsafe { libc::sched_getcpu() }, 0);
            })
            .join()
            .unwrap();
            // So does a child process.
            let out = std::process::Command::new("sh")
                .args(["-c", "grep Cpus_allowed_list /proc/self/status"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(text.split_whitespace().last(), Some("0"), "{text}");
            assert_eq!(pin_process(&ProcessCpus::All).unwrap(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn pinning_to_an_impossible_cpu_is_an_error() {
        assert!(matches!(
            pin_current_thread(RingCpu::Cpu(usize::MAX)),
            Err(AffinityError::OutOfRange(_))
        ));
    }

    #[test]
    fn a_pinned_thread_runs_on_its_cpu() {
        std::thread::spawn(|| {
            assert_eq!(pin_current_thread(RingCpu::Cpu(0)).unwrap(), 0);
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, 0);
        })
        .join()
        .unwrap();
    }
}
