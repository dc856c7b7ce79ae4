//! Registration and control messages (`relay_tunnel::protocol::decode` and `decode_len`): what
//! an agent sends the DMZ before HTTP/2, and what each side sends on the control stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_tunnel::protocol::{
    AgentMessage, DmzMessage, MAX_MESSAGE_LEN, Registration, RegistrationAnswer, decode,
    decode_len, encode,
};

/// A message that decodes must encode and decode back to itself.
fn round_trip<T>(body: &[u8])
where
    T: serde::Serialize + for<'a> serde::Deserialize<'a> + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = decode::<T>(body) {
        let framed = encode(&message);
        let len = decode_len(framed[..4].try_into().unwrap()).expect("our own frame");
        assert_eq!(len, framed.len() - 4);
        assert_eq!(
            decode::<T>(&framed[4..]).expect("our own encoding"),
            message
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.get(..4) {
        if let Ok(len) = decode_len(prefix.try_into().unwrap()) {
            assert!(len <= MAX_MESSAGE_LEN);
        }
    }
    let body = data.get(4..).unwrap_or(data);
    round_trip::<Registration>(body);
    round_trip::<RegistrationAnswer>(body);
    round_trip::<AgentMessage>(body);
    round_trip::<DmzMessage>(body);
});
