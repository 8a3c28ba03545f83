//! How the ranks of a multi-process job learn who they are and find each other.
//!
//! Rank identity comes from the launcher's environment: torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT) or Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT exported
//! by the batch script). Rank 0 then hands one blob (NCCL's unique id, later) to every rank, either over TCP
//! ([`tcp_rendezvous`]: rank 0 listens on MASTER_ADDR:MASTER_PORT) or through a file on shared storage
//! ([`file_rendezvous`]: atomic write by rank 0, polling by the others).
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    Torchrun,
    Slurm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node (which GPU to take); None when the launcher does not say.
    pub local_rank: Option<usize>,
    /// MASTER_ADDR and MASTER_PORT, when both are set.
    pub master: Option<(String, u16)>,
}

fn bad(msg: String) -> Error {
    Error::invalid("launch environment", msg)
}

impl LaunchEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<LaunchEnv> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (tests pass a map). Torchrun variables win over Slurm's when both are
    /// present (torchrun started under srun), but they must then agree on the world size.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("{k}={v:?} is not a non-negative integer")))
                })
                .transpose()
        };
        let (launcher, rank, world, local) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(w)) => {
                if let Some(n) = num("SLURM_NTASKS")? {
                    if n != w && n != 1 {
                        return Err(bad(format!(
                            "WORLD_SIZE={w} but SLURM_NTASKS={n}: torchrun under srun must run one task (SLURM_NTASKS=1) or as many as WORLD_SIZE"
                        )));
                    }
                }
                (Launcher::Torchrun, r, w, num("LOCAL_RANK")?)
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(bad(
                    "RANK and WORLD_SIZE must be set together (torchrun sets both)".to_string(),
                ))
            }
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(w)) => (Launcher::Slurm, r, w, num("SLURM_LOCALID")?),
                (Some(_), None) => {
                    return Err(bad(
                        "SLURM_PROCID is set but SLURM_NTASKS is not: start the job with srun --ntasks N".to_string(),
                    ))
                }
                _ => (Launcher::Single, 0, 1, None),
            },
        };
        let names = match launcher {
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        };
        if world == 0 {
            return Err(bad(format!("{}=0: a job has at least one rank", names.1)));
        }
        if rank >= world {
            return Err(bad(format!(
                "{}={rank} with {}={world}: ranks run 0..{}",
                names.0,
                names.1,
                world - 1
            )));
        }
        if let Some(l) = local {
            if l > rank {
                return Err(bad(format!(
                    "{}={l} is above {}={rank}: a node's local ranks are a subset of the global ones",
                    names.2, names.0
                )));
            }
        }
        let master = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
            (Some(a), Some(p)) => {
                let port = p
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| bad(format!("MASTER_PORT={p:?} is not a port number")))?;
                if a.trim().is_empty() {
                    return Err(bad("MASTER_ADDR is empty".to_string()));
                }
                Some((a.trim().to_string(), port))
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "MASTER_ADDR and MASTER_PORT must be set together".to_string()
                ))
            }
        };
        Ok(LaunchEnv {
            launcher,
            rank,
            world_size: world,
            local_rank: local,
            master,
        })
    }
}

/// Greeting a joining rank sends: magic, then its rank (u32 LE).
const MAGIC: &[u8; 8] = b"EQATRDV1";

fn net_err(what: String, e: std::io::Error) -> Error {
    Error::invalid("rendezvous", format!("{what}: {e}"))
}

/// Rank 0's side: accepts the other `world - 1` ranks on `listener` and sends each `blob`. Fails after
/// `timeout` naming the ranks that never arrived, or on a duplicate or out-of-range rank.
pub fn serve(listener: &TcpListener, world: usize, blob: &[u8], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| net_err("listener".into(), e))?;
    let mut seen = vec![false; world];
    seen[0] = true;
    let mut joined = 1;
    while joined < world {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(10))))
                    .map_err(|e| net_err(format!("connection from {peer}"), e))?;
                let mut hello = [0u8; 12];
                s.read_exact(&mut hello)
                    .map_err(|e| net_err(format!("greeting from {peer}"), e))?;
                if &hello[..8] != MAGIC {
                    return Err(Error::invalid(
                        "rendezvous",
                        format!("{peer} is not an eqat rank (bad greeting)"),
                    ));
                }
                let r = u32::from_le_bytes(hello[8..].try_into().expect("4 bytes")) as usize;
                if r == 0 || r >= world || seen[r] {
                    return Err(Error::invalid(
                        "rendezvous",
                        format!("{peer} claims rank {r} in a world of {world} (already joined or out of range)"),
                    ));
                }
                seen[r] = true;
                joined += 1;
                s.write_all(&(blob.len() as u64).to_le_bytes())
                    .and_then(|_| s.write_all(blob))
                    .map_err(|e| net_err(format!("sending to rank {r}"), e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !seen[r]).collect();
                    return Err(Error::invalid(
                        "rendezvous",
                        format!("rank 0 waited {timeout:?}; ranks {missing:?} never connected"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(net_err("accept".into(), e)),
        }
    }
    Ok(())
}

/// A non-zero rank's side: connects to `addr` (retrying until rank 0 listens or `timeout` passes) and returns
/// rank 0's blob.
pub fn join(addr: &str, rank: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        let tried = addr
            .to_socket_addrs()
            .map_err(|e| net_err(format!("MASTER address {addr}"), e))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok());
        match tried {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                return Err(Error::invalid(
                    "rendezvous",
                    format!("rank {rank} could not reach rank 0 at {addr} within {timeout:?}"),
                ))
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let io = |e| net_err(format!("rank {rank} talking to {addr}"), e);
    s.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))
    .map_err(io)?;
    s.write_all(MAGIC).map_err(io)?;
    s.write_all(&(rank as u32).to_le_bytes()).map_err(io)?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 20 {
        return Err(Error::invalid(
            "rendezvous",
            format!("rank 0 at {addr} announced a {len}-byte blob (limit 1 MiB)"),
        ));
    }
    let mut blob = vec![0u8; len as usize];
    s.read_exact(&mut blob).map_err(io)?;
    Ok(blob)
}

/// Both sides from the launcher's environment: rank 0 listens on MASTER_ADDR:MASTER_PORT and sends `blob`, the
/// others connect and receive it. Every rank returns the blob.
pub fn tcp_rendezvous(env: &LaunchEnv, blob: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    if env.world_size == 1 {
        return Ok(blob.to_vec());
    }
    let Some((host, port)) = &env.master else {
        return Err(bad(
            "a job of several ranks needs MASTER_ADDR and MASTER_PORT (rank 0's host and a free port)".to_string(),
        ));
    };
    let addr = format!("{host}:{port}");
    if env.rank == 0 {
        let l = TcpListener::bind(&addr)
            .map_err(|e| net_err(format!("rank 0 listening on {addr}"), e))?;
        serve(&l, env.world_size, blob, timeout)?;
        Ok(blob.to_vec())
    } else {
        join(&addr, env.rank, timeout)
    }
}

/// The shared-storage alternative: rank 0 writes `blob` to `path` atomically (a temporary file in the same
/// directory, then a rename), the others poll until the file appears. Use a fresh path per job (e.g. with the
/// Slurm job id in it): a file left by an earlier job would be read as this job's.
pub fn file_rendezvous(
    path: &Path,
    rank: usize,
    blob: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    if rank == 0 {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, blob).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        return Ok(blob.to_vec());
    }
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read(path) {
            Ok(b) => return Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if Instant::now() >= deadline {
                    return Err(Error::invalid(
                        "rendezvous",
                        format!("rank {rank}: {} did not appear within {timeout:?} (is rank 0 running, on the same shared storage?)", path.display()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(path, e)),
        }
    }
}

#[cfg(test)]
mod tests;
