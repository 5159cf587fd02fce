//! Little helpers to encode device state for migration: a writer that
//! appends little-endian fields and a reader that refuses to read past the
//! end, so that a truncated or corrupt blob is an error, never a panic.

use crate::Error;

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty writer.
    pub fn new() -> StateWriter {
        StateWriter::default()
    }

    /// Append a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Append a bool as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Append raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Append a u32 length followed by the bytes.
    pub fn blob(&mut self, v: &[u8]) -> Result<&mut Self, Error> {
        let len = u32::try_from(v.len())
            .map_err(|_| Error::InvalidArgument("state blob larger than 4 GiB".into()))?;
        Ok(self.u32(len).bytes(v))
    }

    /// The encoded state.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian fields, failing cleanly on a short buffer.
#[derive(Debug)]
pub struct StateReader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> StateReader<'a> {
    /// Read `buf`; `what` names the state in error messages.
    pub fn new(buf: &'a [u8], what: &'static str) -> StateReader<'a> {
        StateReader { buf, what }
    }

    /// An error about this state.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!("{} state: {msg}", self.what))
    }

    /// Take `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(self.error(format!(
                "truncated ({} bytes left, {n} needed)",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// Take a byte.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }

    /// Take a bool; anything but 0 or 1 is an error.
    pub fn bool(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.error(format!("invalid boolean {v}"))),
        }
    }

    /// Take a u16.
    pub fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Take a u32.
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Take a u64.
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Take a u32 length and that many bytes.
    pub fn blob(&mut self) -> Result<&'a [u8], Error> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| self.error("blob length"))?;
        self.bytes(len)
    }

    /// Check a magic value and return the version that follows it.
    pub fn header(&mut self, magic: &[u8; 8]) -> Result<u32, Error> {
        let got = self.bytes(8)?;
        if got != magic {
            return Err(self.error("bad magic (not this kind of device)"));
        }
        self.u32()
    }

    /// Fail unless every byte was consumed.
    pub fn finish(self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut w = StateWriter::new();
        w.bytes(b"MAGICxyz").u32(7).u8(1).bool(true).u16(0x1234);
        w.u32(0xdead_beef).u64(u64::MAX);
        w.blob(b"abc").unwrap();
        let buf = w.finish();

        let mut r = StateReader::new(&buf, "test");
        assert_eq!(r.header(b"MAGICxyz").unwrap(), 7);
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.bool().unwrap());
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.blob().unwrap(), b"abc");
        r.finish().unwrap();

        for cut in 0..buf.len() {
            let mut r = StateReader::new(&buf[..cut], "test");
            let ok = (|| -> Result<(), Error> {
                r.header(b"MAGICxyz")?;
                r.u8()?;
                r.bool()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.blob()?;
                Ok(())
            })();
            assert!(ok.is_err(), "truncated at {cut} accepted");
        }
        let mut r = StateReader::new(b"MAGICxyX\0\0\0\0", "test");
        assert!(r.header(b"MAGICxyz").is_err());
        let mut r = StateReader::new(&[2], "test");
        assert!(r.bool().is_err());
        let r = StateReader::new(&[0], "test");
        assert!(r.finish().is_err());
        // a huge blob length is an error, not an allocation
        let mut r = StateReader::new(&[0xff, 0xff, 0xff, 0xff, 1], "test");
        assert!(r.blob().is_err());
    }
}
