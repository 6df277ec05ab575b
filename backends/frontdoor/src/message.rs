//! Framing of vhost-user messages on a UNIX stream: a 12-byte header, a body of `size` bytes,
//! and the file descriptors that travel with the header.
//!
//! The front door only needs message boundaries and a few fields, so it reads every message
//! whole, with hard limits, and leaves the meaning of the body to the daemon behind it.

use std::io::{self, Read};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::{c_void, iovec};
use vhost::vhost_user::message::{VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest body accepted, as in the vhost crate: every message but GPU updates fits in 4 KiB.
pub(crate) const MAX_BODY_SIZE: usize = MAX_MSG_SIZE;
/// Most file descriptors one message may carry (SET_MEM_TABLE: one per region).
pub(crate) const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;

/// Protocol version carried in the low flag bits of every message.
const VERSION_1: u32 = 1;

/// Why a peer's bytes could not be framed as a message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("Connection closed in the middle of a message")]
    Truncated,
    #[error("Message body of {0} bytes exceeds the {MAX_BODY_SIZE}-byte limit")]
    TooLarge(u32),
    #[error("More than {MAX_FDS} file descriptors attached to one message")]
    TooManyFds,
    #[error("Socket error")]
    Io(#[source] io::Error),
}

/// The vhost-user message header (vhost keeps its own type private). Native byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

// SAFETY: three u32 fields with no padding; every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    /// A version-1 request header with `flags` (NEED_REPLY or nothing) and no body.
    pub fn request(request: u32, flags: VhostUserHeaderFlag) -> Self {
        Header {
            request,
            flags: VERSION_1 | flags.bits(),
            size: 0,
        }
    }

    pub fn has_flag(&self, flag: VhostUserHeaderFlag) -> bool {
        self.flags & flag.bits() != 0
    }
}

/// One whole message with the descriptors that came with it.
#[derive(Debug, Default)]
pub(crate) struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with `header` and `body`; `header.size` is set from the body.
    pub fn new(mut header: Header, body: Vec<u8>) -> Self {
        // Bodies built by the front door are a few bytes long.
        header.size = u32::try_from(body.len()).unwrap_or(u32::MAX);
        Message {
            header,
            body,
            fds: Vec::new(),
        }
    }

    /// A REPLY_ACK acknowledgement of `request` with `status` (0 is success).
    pub fn ack(request: u32, status: u64) -> Self {
        let header = Header {
            request,
            flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
            size: 0,
        };
        Message::new(header, status.to_ne_bytes().to_vec())
    }

    /// Shortens the body to `len` bytes, keeping `header.size` in step.
    pub fn truncate_body(&mut self, len: usize) {
        self.body.truncate(len);
        // At most MAX_BODY_SIZE: bodies come from `read_message` or from the front door.
        self.header.size = u32::try_from(self.body.len()).unwrap_or(u32::MAX);
    }
}

/// Reads one message. `Ok(None)` means the peer closed the connection between messages.
pub(crate) fn read_message(stream: &UnixStream) -> Result<Option<Message>, MessageError> {
    let mut header = Header::default();
    let (count, fds) = recv_header(stream, header.as_mut_slice())?;
    if count == 0 {
        return Ok(None);
    }
    if count < mem::size_of::<Header>() {
        read_exact(stream, &mut header.as_mut_slice()[count..])?;
    }
    if header.size as usize > MAX_BODY_SIZE {
        return Err(MessageError::TooLarge(header.size));
    }
    let mut body = vec![0u8; header.size as usize];
    read_exact(stream, &mut body)?;
    Ok(Some(Message { header, body, fds }))
}

/// Writes one message; the descriptors travel with its first byte.
pub(crate) fn write_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let header = message.header.as_slice();
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let total = header.len() + message.body.len();
    let mut sent = retry_interrupted(|| stream.send_with_fds(&[header, &message.body], &fds))?;
    // A stream socket may take a large message in pieces; the rest goes without descriptors.
    while sent < total {
        let (head_rest, body_rest) = if sent < header.len() {
            (&header[sent..], &message.body[..])
        } else {
            (&header[..0], &message.body[sent - header.len()..])
        };
        let more = retry_interrupted(|| stream.send_with_fds(&[head_rest, body_rest], &[]))?;
        if more == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += more;
    }
    Ok(())
}

/// Receives up to `buf.len()` header bytes and the descriptors sent with them.
fn recv_header(stream: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), MessageError> {
    let mut raw_fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    }];
    let (count, fd_count) = loop {
        // SAFETY: the iovec covers exactly `buf`, which is borrowed mutably for the call, and
        // any bytes are valid for the plain-integer header.
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) } {
            Ok(received) => break received,
            Err(e) if e.errno() == libc::EINTR => {}
            // The kernel truncated the descriptor list and vmm-sys-util closed what arrived.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(MessageError::TooManyFds),
            Err(e) => return Err(MessageError::Io(io::Error::from_raw_os_error(e.errno()))),
        }
    };
    let fds = raw_fds[..fd_count.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in this process; nothing else
        // refers to them, so each gets exactly one owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((count, fds))
}

fn read_exact(mut stream: &UnixStream, buf: &mut [u8]) -> Result<(), MessageError> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => MessageError::Truncated,
        _ => MessageError::Io(e),
    })
}

fn retry_interrupted(
    mut send: impl FnMut() -> vmm_sys_util::errno::Result<usize>,
) -> io::Result<usize> {
    loop {
        match send() {
            Ok(count) => return Ok(count),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn raw_header(request: u32, flags: u32, size: u32) -> Vec<u8> {
        [request, flags, size]
            .iter()
            .flat_map(|field| field.to_ne_bytes())
            .collect()
    }

    #[test]
    fn message_round_trips_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = TempFile::new().unwrap();
        let fd = file.as_file().as_fd().try_clone_to_owned().unwrap();
        let mut header = Header::request(5, VhostUserHeaderFlag::NEED_REPLY);
        header.size = 40;
        let message = Message {
            header,
            body: vec![7; 40],
            fds: vec![fd],
        };
        write_message(&a, &message).unwrap();
        let received = read_message(&b).unwrap().unwrap();
        assert_eq!(received.header, message.header);
        assert_eq!(received.header.size, 40);
        assert!(received.header.has_flag(VhostUserHeaderFlag::NEED_REPLY));
        assert_eq!(received.body, vec![7; 40]);
        assert_eq!(received.fds.len(), 1);
        // The descriptor is a new one for the same open file.
        let original = file.as_file().metadata().unwrap();
        let passed = std::fs::File::from(received.fds.into_iter().next().unwrap());
        assert_eq!(passed.metadata().unwrap().len(), original.len());
        drop(a);
        assert!(read_message(&b).unwrap().is_none());
    }

    /// Bytes queued on `socket` and not yet read.
    fn unread(socket: &UnixStream) -> libc::c_int {
        let mut count: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the valid pointer.
        let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut count) };
        assert_eq!(ret, 0);
        count
    }

    #[test]
    fn header_split_over_writes_is_reassembled() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let probe = b.try_clone().unwrap();
        let bytes = [raw_header(1, 1, 2), vec![0xaa, 0xbb]].concat();
        a.write_all(&bytes[..5]).unwrap();
        let reader = std::thread::spawn(move || read_message(&b));
        // Only once the reader has taken the first 5 bytes does the rest arrive.
        while unread(&probe) != 0 {
            std::thread::yield_now();
        }
        a.write_all(&bytes[5..]).unwrap();
        let message = reader.join().unwrap().unwrap().unwrap();
        assert_eq!(message.header.request, 1);
        assert_eq!(message.body, [0xaa, 0xbb]);
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&raw_header(24, 1, MAX_BODY_SIZE as u32 + 1))
            .unwrap();
        assert!(matches!(
            read_message(&b),
            Err(MessageError::TooLarge(size)) if size == MAX_BODY_SIZE as u32 + 1
        ));
        a.write_all(&raw_header(24, 1, u32::MAX)).unwrap();
        assert!(matches!(read_message(&b), Err(MessageError::TooLarge(_))));
    }

    #[test]
    fn hang_up_inside_a_message_is_truncation() {
        for bytes in [raw_header(1, 1, 8)[..7].to_vec(), {
            let mut partial = raw_header(1, 1, 8);
            partial.extend_from_slice(&[1, 2, 3]);
            partial
        }] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&bytes).unwrap();
            drop(a);
            assert!(matches!(read_message(&b), Err(MessageError::Truncated)));
        }
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = TempFile::new().unwrap();
        let fds: Vec<RawFd> = vec![file.as_file().as_raw_fd(); MAX_FDS + 1];
        let header = raw_header(5, 1, 0);
        a.send_with_fds(&[&header[..]], &fds).unwrap();
        assert!(matches!(read_message(&b), Err(MessageError::TooManyFds)));
    }
}
