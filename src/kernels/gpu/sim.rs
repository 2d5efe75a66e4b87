//! Runs a kernel's `.cu` or `.metal` source on the CPU: its host driver (`sim.cpp`, in the op's
//! folder) is compiled once per process and [`Target`] with g++ and `shim.h` (one thread per GPU
//! thread), then run on an input file. With `SAPO_SIM_TSAN=1` it is compiled under
//! ThreadSanitizer and a data race fails the run. For this crate's tests only (the `gpu-sim`
//! feature).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use super::program::Program;

/// The kernels' source folder.
const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernels");

/// Which kernel sources the simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// The `.cu` files (warps of 32).
    Cuda,
    /// The `.metal` files, with SIMD groups of `simd_width` threads (32 on Apple GPUs; 8 also
    /// runs, to show the kernels do not depend on it).
    Metal { simd_width: u32 },
}

thread_local! {
    /// The simulation this thread runs `Backend::Fused` calls on ([`crate::simulation`]).
    static CURRENT: std::cell::Cell<Option<Target>> = const { std::cell::Cell::new(None) };
}

/// The simulation this thread runs, if any.
pub(crate) fn current() -> Option<Target> {
    CURRENT.with(|c| c.get())
}

/// Sets this thread's simulation; returns the previous one.
pub(crate) fn set_current(target: Option<Target>) -> Option<Target> {
    CURRENT.with(|c| c.replace(target))
}

fn failed(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("GPU simulation: {what}"))
}

/// The executable built from `<op>/sim.cpp` for `target`, compiled on first use. For Metal the
/// driver includes the op's program as the host code hands it to Apple's compiler (one string,
/// [`Program::source`]), written next to the executable.
fn executable(program: &Program, target: Target) -> candle_core::Result<PathBuf> {
    let op = program.op;
    static BUILT: OnceLock<Mutex<HashMap<(String, Target), PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (op.to_string(), target);
    if let Some(path) = built.get(&key) {
        return Ok(path.clone());
    }
    let tsan = std::env::var("SAPO_SIM_TSAN").is_ok_and(|v| v == "1");
    let dir = std::env::temp_dir().join(format!("sapo-gpu-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let language = match target {
        Target::Cuda => "cuda".to_string(),
        Target::Metal { simd_width } => format!("metal{simd_width}"),
    };
    let exe = dir.join(format!(
        "{op}-{language}{}",
        if tsan { "-tsan" } else { "" }
    ));
    let source = Path::new(KERNELS).join(op).join("sim.cpp");
    let mut cmd = Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()));
    cmd.args(["-std=c++20", "-g", "-pthread", "-Wall", "-Werror"]);
    if tsan {
        cmd.args(["-O1", "-fsanitize=thread"]);
    } else {
        cmd.arg("-O2");
    }
    if let Target::Metal { simd_width } = target {
        let metal = dir.join(format!("{op}.metal"));
        std::fs::write(&metal, program.source())
            .map_err(|e| failed(format!("{}: {e}", metal.display())))?;
        // One program for every SIMD width: checked once per process.
        let checked = built
            .keys()
            .any(|(built_op, t)| built_op == op && matches!(t, Target::Metal { .. }));
        if !checked {
            check_msl(&metal)?;
        }
        // MSL's attributes (`[[buffer(0)]]`) mean nothing to g++.
        cmd.args(["-DSAPO_METAL", "-Wno-attributes"]);
        cmd.arg(format!("-DSAPO_SIM_SIMD_WIDTH={simd_width}"));
        cmd.arg(format!("-DSAPO_SIM_METAL_SOURCE=\"{}\"", metal.display()));
    }
    cmd.arg(&source).arg("-o").arg(&exe);
    compile(cmd, &format!("compiling {}", source.display()))?;
    built.insert(key, exe.clone());
    Ok(exe)
}

/// Runs a compiler; its diagnostics become the error, after `what`.
fn compile(mut cmd: Command, what: &str) -> candle_core::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|e| failed(format!("running {program} ({what}): {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{what}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Checks a Metal program with clang (`$SAPO_MSL_CHECK_CXX`, else `clang++`) as Apple's compiler
/// would see it (`__METAL_VERSION__` set), against the stand-in `gpu/msl/metal_stdlib`: MSL's
/// address spaces, its built-ins only, no `double`, no exceptions or RTTI. What g++ compiles
/// through the shim, which makes the address spaces plain C++, must pass this first.
fn check_msl(metal: &Path) -> candle_core::Result<()> {
    let mut cmd =
        Command::new(std::env::var("SAPO_MSL_CHECK_CXX").unwrap_or_else(|_| "clang++".into()));
    cmd.args([
        "-x",
        "c++",
        "-std=c++17",
        "-fsyntax-only",
        "-fno-exceptions",
        "-fno-rtti",
    ])
    .args([
        "-D__METAL_VERSION__=300",
        "-Wall",
        "-Werror",
        "-Wno-unknown-attributes",
    ])
    .arg("-I")
    .arg(Path::new(KERNELS).join("gpu/msl"))
    .arg(metal);
    compile(cmd, &format!("the MSL check of {}", metal.display()))
}

/// Runs the simulation of `program`'s op for `target` on `input`; returns what it wrote.
pub(crate) fn run(program: &Program, target: Target, input: &[u8]) -> candle_core::Result<Vec<u8>> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let op = program.op;
    let exe = executable(program, target)?;
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (in_path, out_path) = (
        PathBuf::from(format!("{}.{call}.in", exe.display())),
        PathBuf::from(format!("{}.{call}.out", exe.display())),
    );
    std::fs::write(&in_path, input).map_err(|e| failed(format!("{}: {e}", in_path.display())))?;
    let out = Command::new(&exe)
        .arg(&in_path)
        .arg(&out_path)
        .env("TSAN_OPTIONS", "halt_on_error=1 exitcode=66")
        .output()
        .map_err(|e| failed(format!("running {}: {e}", exe.display())))?;
    let _ = std::fs::remove_file(&in_path);
    if !out.status.success() {
        let _ = std::fs::remove_file(&out_path);
        return Err(failed(format!(
            "{op} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bytes =
        std::fs::read(&out_path).map_err(|e| failed(format!("{}: {e}", out_path.display())))?;
    let _ = std::fs::remove_file(&out_path);
    Ok(bytes)
}

/// The elements of a contiguous CPU storage as bytes (f32, f16, bf16 or u8).
pub(crate) fn storage_bytes(
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<Vec<u8>> {
    use candle_core::backend::BackendStorage;
    use candle_core::CpuStorage;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| failed("input must be contiguous".into()))?;
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::F16(v) => v[start..end]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::BF16(v) => v[start..end]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::U8(v) => v[start..end].to_vec(),
        other => candle_core::bail!("GPU simulation: unsupported dtype {:?}", other.dtype()),
    })
}

/// A CPU tensor's elements as bytes (f32, f16, bf16, u8, u32 or i64).
pub(crate) fn tensor_bytes(t: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    use candle_core::DType;
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => candle_core::bail!("GPU simulation: unsupported dtype {other:?}"),
    })
}

/// A tensor of `shape` from the little-endian bytes of its elements (f32, f16 or bf16).
pub(crate) fn tensor_from_bytes(
    bytes: &[u8],
    dtype: candle_core::DType,
    shape: impl Into<candle_core::Shape>,
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    let halves = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    match dtype {
        DType::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_vec(v, shape, device)
        }
        DType::F16 => Tensor::from_vec(halves().map(half::f16::from_bits).collect(), shape, device),
        DType::BF16 => {
            Tensor::from_vec(halves().map(half::bf16::from_bits).collect(), shape, device)
        }
        other => candle_core::bail!("GPU simulation: unsupported dtype {other:?}"),
    }
}
