//! Minimal raw-TCP MQTT 3.1.1 client pieces (CONNECT/SUBSCRIBE/PUBLISH QoS1/PUBACK/PINGREQ)
//! used for the thousands of simulated devices (one tokio task + one socket each).
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn put_len(b: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 { byte |= 0x80; }
        b.put_u8(byte);
        if n == 0 { break; }
    }
}
fn put_str(b: &mut BytesMut, s: &[u8]) { b.put_u16(s.len() as u16); b.put_slice(s); }

pub fn connect(client_id: &str, user: &str, pass: &str, clean: bool, keepalive: u16) -> BytesMut {
    let mut body = BytesMut::new();
    put_str(&mut body, b"MQTT");
    body.put_u8(4);
    body.put_u8(0x80 | 0x40 | if clean { 0x02 } else { 0 });
    body.put_u16(keepalive);
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, user.as_bytes());
    put_str(&mut body, pass.as_bytes());
    frame(0x10, body)
}
pub fn subscribe(pid: u16, filter: &str, qos: u8) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u16(pid);
    put_str(&mut body, filter.as_bytes());
    body.put_u8(qos);
    frame(0x82, body)
}
pub fn publish_qos1(pid: u16, topic: &str, payload: &[u8]) -> BytesMut {
    let mut body = BytesMut::new();
    put_str(&mut body, topic.as_bytes());
    body.put_u16(pid);
    body.put_slice(payload);
    frame(0x32, body)
}
pub fn puback(pid: u16) -> [u8; 4] { [0x40, 2, (pid >> 8) as u8, pid as u8] }
pub const PINGREQ: [u8; 2] = [0xC0, 0];
fn frame(h: u8, body: BytesMut) -> BytesMut {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(h);
    put_len(&mut b, body.len());
    b.put_slice(&body);
    b
}

/// Try to split one complete packet (header byte, body) off the front of buf.
pub fn try_parse(buf: &mut BytesMut) -> io::Result<Option<(u8, Bytes)>> {
    if buf.len() < 2 { return Ok(None); }
    let mut len = 0usize; let mut mult = 1usize; let mut i = 1;
    loop {
        if i >= buf.len() { return Ok(None); }
        let byte = buf[i];
        len += (byte & 0x7f) as usize * mult;
        mult *= 128; i += 1;
        if byte & 0x80 == 0 { break; }
        if i > 4 { return Err(io::Error::new(io::ErrorKind::InvalidData, "bad remaining length")); }
    }
    if buf.len() < i + len { return Ok(None); }
    let h = buf[0];
    buf.advance(i);
    Ok(Some((h, buf.split_to(len).freeze())))
}

pub async fn read_packet(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<(u8, Bytes)> {
    loop {
        if let Some(p) = try_parse(buf)? { return Ok(p); }
        if s.read_buf(buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
    }
}

/// Parsed incoming PUBLISH: (qos, topic, pid, payload)
pub fn parse_publish(h: u8, mut body: Bytes) -> (u8, String, u16, Bytes) {
    let qos = (h >> 1) & 3;
    let tl = body.get_u16() as usize;
    let topic = String::from_utf8_lossy(&body[..tl]).into_owned();
    body.advance(tl);
    let pid = if qos > 0 { body.get_u16() } else { 0 };
    (qos, topic, pid, body)
}

pub async fn send(s: &mut TcpStream, b: &[u8]) -> io::Result<()> { s.write_all(b).await }
