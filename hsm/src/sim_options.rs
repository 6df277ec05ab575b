//! How faithfully [`crate::SimHypervisor`] plays hvisor and hvisor.ko. Every default is what
//! the real hvisor 6a3fb78 and its module do; the other values keep the simulator's earlier,
//! friendlier behaviour available for comparison.

use std::fmt;
use std::str::FromStr;

use crate::abi::HvisorAbi;
use crate::HsmError;

/// How the hypervisor side reads `need_wakeup` after publishing a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SimOrdering {
    /// hvisor's: no StoreLoad barrier between the `req_rear` store and the `need_wakeup`
    /// load, so a wakeup is occasionally lost and the daemon's guard timeout recovers it.
    #[default]
    Hvisor,
    /// A SeqCst fence before the load: no wakeup is ever lost.
    Fenced,
}

/// Which accesses at window offset 0x50 (QueueNotify) are asynchronous.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NotifyAccess {
    /// hvisor's: any access there, reads included (a read returns 0 at once, unreplied).
    #[default]
    Any,
    /// Writes only; a read there waits for the daemon's reply.
    WritesOnly,
}

/// How the simulator wakes a sleeping bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SimWakeup {
    /// An eventfd, as hvisor.ko with `HVISOR_SET_EVENTFD` (2026-02 and later).
    #[default]
    Eventfd,
    /// Signal 10 to the bridge thread that registered last, as older hvisor.ko modules do
    /// for the thread that did INIT_VIRTIO.
    Signal,
}

/// What the RAM fds handed to the bridge look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SimRamLayout {
    /// hvisor.ko's: one file for everything, the bridge page at offset 0, each zone RAM
    /// region at offset = its physical address (`zone0_ipa`), and nothing (a hole standing
    /// for root Linux's RAM) elsewhere. A backend must map each region at the offset it is
    /// given.
    #[default]
    Physical,
    /// One memfd per region, mapped from offset 0.
    MemfdPerRegion,
}

/// The simulator's modes, and the bridge-page layout it plays.
///
/// `FromStr` takes a comma-separated list of words, each overriding one default:
/// `fenced`, `sync-notify-reads`, `signal-wakeup`, `memfd-per-region`, `abi=R/D/C`,
/// `lose-wakeup-every=N`, `drop-while-active`; the empty string and `hvisor` give the
/// defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimOptions {
    /// `need_wakeup` ordering.
    pub ordering: SimOrdering,
    /// Asynchronous accesses at window offset 0x50.
    pub notify: NotifyAccess,
    /// How the bridge is woken.
    pub wakeup: SimWakeup,
    /// Layout of the RAM fds.
    pub ram: SimRamLayout,
    /// The bridge-page layout.
    pub abi: HvisorAbi,
    /// When not 0, every Nth request that finds `need_wakeup` set sends no wakeup: the
    /// outcome of hvisor's missing StoreLoad fence (its load returned the stale 0), made
    /// deterministic so that a test can count each loss and the guard that recovers it.
    pub lose_wakeup_every: u32,
    /// Drop an injection whose IRQ the guest has taken and not yet finished handling, as
    /// hvisor's GICv3 `inject_irq` does when a list register holds the IRQ active. The
    /// simulated guest takes a line's IRQ in [`crate::SimHypervisor::wait_irq`] and finishes
    /// with it when it waits on that line again. Off: every injection is delivered.
    pub drop_while_active: bool,
}

impl SimOptions {
    /// The environment variable [`SimOptions::from_env`] reads.
    pub const ENV: &'static str = "HVISOR_SIM_OPTIONS";

    /// The options in [`SimOptions::ENV`], or the defaults when it is unset: lets a whole
    /// test run be repeated with the old behaviour (e.g. `HVISOR_SIM_OPTIONS=fenced`).
    pub fn from_env() -> Result<SimOptions, HsmError> {
        match std::env::var(Self::ENV) {
            Ok(value) => value.parse(),
            Err(std::env::VarError::NotPresent) => Ok(SimOptions::default()),
            Err(e) => Err(HsmError::SimConfig(format!("{}: {e}", Self::ENV))),
        }
    }
}

impl FromStr for SimOptions {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut options = SimOptions::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "hvisor" => {}
                "fenced" => options.ordering = SimOrdering::Fenced,
                "sync-notify-reads" => options.notify = NotifyAccess::WritesOnly,
                "signal-wakeup" => options.wakeup = SimWakeup::Signal,
                "memfd-per-region" => options.ram = SimRamLayout::MemfdPerRegion,
                "drop-while-active" => options.drop_while_active = true,
                _ => {
                    if let Some(abi) = word.strip_prefix("abi=") {
                        options.abi = abi.parse()?;
                    } else if let Some(n) = word.strip_prefix("lose-wakeup-every=") {
                        options.lose_wakeup_every = n.parse().map_err(|e| {
                            HsmError::SimConfig(format!("simulator option {word:?}: {e}"))
                        })?;
                    } else {
                        return Err(HsmError::SimConfig(format!(
                            "unknown simulator option {word:?} (known: hvisor, fenced, \
                             sync-notify-reads, signal-wakeup, memfd-per-region, abi=R/D/C, \
                             lose-wakeup-every=N, drop-while-active)"
                        )));
                    }
                }
            }
        }
        Ok(options)
    }
}

impl fmt::Display for SimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = vec!["hvisor".to_owned()];
        if self.ordering == SimOrdering::Fenced {
            words.push("fenced".into());
        }
        if self.notify == NotifyAccess::WritesOnly {
            words.push("sync-notify-reads".into());
        }
        if self.wakeup == SimWakeup::Signal {
            words.push("signal-wakeup".into());
        }
        if self.ram == SimRamLayout::MemfdPerRegion {
            words.push("memfd-per-region".into());
        }
        if self.abi != HvisorAbi::CURRENT {
            words.push(format!("abi={}", self.abi));
        }
        if self.lose_wakeup_every != 0 {
            words.push(format!("lose-wakeup-every={}", self.lose_wakeup_every));
        }
        if self.drop_while_active {
            words.push("drop-while-active".into());
        }
        f.write_str(&words.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_print() {
        assert_eq!("".parse::<SimOptions>().unwrap(), SimOptions::default());
        assert_eq!(
            "hvisor".parse::<SimOptions>().unwrap(),
            SimOptions::default()
        );
        let all: SimOptions =
            "fenced, sync-notify-reads,signal-wakeup,memfd-per-region,abi=32/4/4,lose-wakeup-every=7,\
             drop-while-active"
                .parse()
                .unwrap();
        assert_eq!(
            all,
            SimOptions {
                ordering: SimOrdering::Fenced,
                notify: NotifyAccess::WritesOnly,
                wakeup: SimWakeup::Signal,
                ram: SimRamLayout::MemfdPerRegion,
                abi: HvisorAbi::new(32, 4, 4),
                lose_wakeup_every: 7,
                drop_while_active: true,
            }
        );
        assert_eq!(all.to_string().parse::<SimOptions>().unwrap(), all);
        assert_eq!(SimOptions::default().to_string(), "hvisor");
        assert!(matches!(
            "fence".parse::<SimOptions>(),
            Err(HsmError::SimConfig(_))
        ));
        assert!(matches!(
            "lose-wakeup-every=x".parse::<SimOptions>(),
            Err(HsmError::SimConfig(_))
        ));
        assert!(matches!(
            "abi=3/8/32".parse::<SimOptions>(),
            Err(HsmError::Abi(_))
        ));
    }
}
