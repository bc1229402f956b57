//! What a `.pth` may make an unpickler do. Its pickle opcodes are walked, never executed, and
//! every global it names must be one of the few that rebuild a state_dict of tensors, so a
//! malicious file (one that would call `os.system`, say) is refused before candle's reader,
//! which interprets the pickle, ever sees it.

use std::io::Read;
use std::path::Path;

/// The globals a `torch.save(model.state_dict())` pickle references (module, name).
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// A pickle larger than this is not a state_dict's index (the tensors live beside it).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Checks every `*data.pkl` of the zip-format `.pth` at `path`; the error says what was refused.
pub fn check_pth(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        format!(
            "not a zip-format .pth ({e}); legacy torch.save files are not supported: re-save with \
             torch.save(state_dict, path) from PyTorch ≥ 1.6"
        )
    })?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    if names.is_empty() {
        return Err("the zip holds no data.pkl: not a torch.save file".into());
    }
    for name in names {
        let entry = zip.by_name(&name).map_err(|e| format!("{name}: {e}"))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!(
                "{name} claims {} bytes; a state_dict's pickle is far smaller",
                entry.size()
            ));
        }
        let mut bytes = Vec::new();
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        check_pickle(&bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Walks a pickle's opcodes up to STOP; refuses any global outside `ALLOWED`, the extension
/// registry, a STACK_GLOBAL whose names are not literal strings, and malformed streams.
pub fn check_pickle(p: &[u8]) -> Result<(), String> {
    let mut i = 0usize;
    // The string constants pushed most recently, for STACK_GLOBAL; any other push clears it.
    let mut strings: Vec<String> = Vec::new();
    let take = |i: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = i
            .checked_add(n)
            .filter(|&e| e <= p.len())
            .ok_or_else(|| format!("truncated pickle: {n} bytes wanted at byte {i}"))?;
        let s = &p[*i..end];
        *i = end;
        Ok(s)
    };
    let line = |i: &mut usize| -> Result<String, String> {
        let rest = p.get(*i..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated pickle: unterminated line at byte {i}"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        *i += n + 1;
        Ok(s)
    };
    let len = |b: &[u8]| -> usize {
        let mut v = [0u8; 8];
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v).try_into().unwrap_or(usize::MAX)
    };
    let allow = |module: &str, name: &str, at: usize| -> Result<(), String> {
        if ALLOWED.iter().any(|&(m, n)| m == module && n == name) {
            Ok(())
        } else {
            Err(format!(
                "refused: the pickle references `{module}.{name}` (byte {at}); a state_dict of \
                 tensors references only collections.OrderedDict and torch's tensor/storage \
                 rebuilders, and tarflow never runs pickled code"
            ))
        }
    };
    loop {
        let at = i;
        let op = *take(&mut i, 1)?.first().unwrap_or(&0);
        let mut pushed_string = None;
        match op {
            b'.' => return Ok(()), // STOP
            // Globals: checked against the allow-list.
            b'c' | b'i' => {
                let (module, name) = (line(&mut i)?, line(&mut i)?);
                allow(&module, &name, at)?;
            }
            0x93 => {
                // STACK_GLOBAL
                let n = strings.len();
                if n < 2 {
                    return Err(format!(
                        "refused: STACK_GLOBAL at byte {at} names a global through computed values"
                    ));
                }
                allow(&strings[n - 2], &strings[n - 1], at)?;
            }
            0x82..=0x84 => {
                return Err(format!(
                "refused: the pickle uses the extension registry (opcode {op:#04x} at byte {at})"
            ))
            }
            // String constants.
            b'X' | 0x8c | 0x8d => {
                let w = match op {
                    b'X' => 4,
                    0x8c => 1,
                    _ => 8,
                };
                let n = len(take(&mut i, w)?);
                pushed_string = Some(String::from_utf8_lossy(take(&mut i, n)?).into_owned());
            }
            b'V' | b'S' => pushed_string = Some(line(&mut i)?),
            // Memo stores do not change the stack.
            b'q' => {
                take(&mut i, 1)?;
                continue;
            }
            b'r' => {
                take(&mut i, 4)?;
                continue;
            }
            b'p' => {
                line(&mut i)?;
                continue;
            }
            0x94 => continue, // MEMOIZE
            0x95 => {
                take(&mut i, 8)?; // FRAME: a length hint only
                continue;
            }
            0x80 => {
                take(&mut i, 1)?; // PROTO
                continue;
            }
            // Length-prefixed data.
            b'T' | b'B' => {
                let n = len(take(&mut i, 4)?);
                take(&mut i, n)?;
            }
            b'U' | b'C' | 0x8a => {
                let n = len(take(&mut i, 1)?);
                take(&mut i, n)?;
            }
            0x8b => {
                let n = len(take(&mut i, 4)?);
                take(&mut i, n)?;
            }
            0x8e | 0x96 => {
                let n = len(take(&mut i, 8)?);
                take(&mut i, n)?;
            }
            // Fixed-size arguments.
            b'K' | b'h' => {
                take(&mut i, 1)?;
            }
            b'M' => {
                take(&mut i, 2)?;
            }
            b'J' | b'j' => {
                take(&mut i, 4)?;
            }
            b'G' => {
                take(&mut i, 8)?;
            }
            // Newline-terminated arguments.
            b'I' | b'L' | b'F' | b'P' | b'g' => {
                line(&mut i)?;
            }
            // No argument.
            b'N'
            | b')'
            | b']'
            | b'}'
            | b'('
            | b't'
            | b'l'
            | b'd'
            | b'a'
            | b'e'
            | b's'
            | b'u'
            | b'b'
            | b'R'
            | b'0'
            | b'1'
            | b'2'
            | b'Q'
            | b'o'
            | 0x81
            | 0x85..=0x89
            | 0x8f
            | 0x90..=0x92
            | 0x97
            | 0x98 => {}
            other => {
                return Err(format!(
                    "malformed pickle: unknown opcode {other:#04x} at byte {at}"
                ))
            }
        }
        match pushed_string {
            Some(s) => {
                strings.push(s);
                if strings.len() > 2 {
                    strings.remove(0);
                }
            }
            None => strings.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_pickle;

    #[test]
    fn a_state_dict_pickle_passes_and_os_system_is_refused() {
        // protocol 2: GLOBAL collections OrderedDict, EMPTY_TUPLE, REDUCE, STOP
        assert!(check_pickle(b"\x80\x02ccollections\nOrderedDict\nq\x00)R.").is_ok());
        // protocol 2 pickle of a class whose __reduce__ returns (os.system, ("echo pwned",))
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let e = check_pickle(evil).unwrap_err();
        assert!(e.contains("posix.system") && e.contains("refused"), "{e}");
        // protocol 4: SHORT_BINUNICODE 'os', MEMOIZE, SHORT_BINUNICODE 'system', MEMOIZE, STACK_GLOBAL
        let evil4 = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.";
        let e = check_pickle(evil4).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        // builtins.eval through INST
        assert!(check_pickle(b"(S'1'\nibuiltins\neval\n.").is_err());
        assert!(check_pickle(b"\x80\x02\x82\x01.")
            .unwrap_err()
            .contains("extension"));
    }

    #[test]
    fn malformed_pickles_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"ccollections",
            b"\xff",
        ] {
            assert!(check_pickle(bad).is_err(), "{bad:?}");
        }
    }
}
