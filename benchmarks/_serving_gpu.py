"""GPU utilisation while a benchmark runs, sampled in the background from NVML.

Owns: one sampler with three sources, tried in this order: ``pynvml`` (package ``nvidia-ml-py``) polled
from a thread; ``nvidia-smi --query-gpu=utilization.gpu --loop-ms=<interval>`` in a subprocess whose
lines a thread parses (through a pseudo-terminal, so no pipe buffer holds them back); neither (or
``enabled=False``, e.g. on CPU): "n/a". Utilisation is NVML's: the percent of the last sample period in
which a kernel ran on the GPU (not how busy the SMs were).

    with UtilizationSampler(enabled=on_gpu) as gpu:
        run()
    gpu.summary()  # {"gpu_util_mean_pct": 87.5, "gpu_util_max_pct": 99.0, "gpu_util_samples": 412,
                   #  "gpu_util_source": "nvml"}
"""

from __future__ import annotations

import os
import pty
import shutil
import signal
import subprocess
import threading


def visible_gpu() -> str:
    """The GPU JAX/torch call device 0, as nvidia-smi / NVML name it (index or UUID)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def parse_utilization(line: str) -> float | None:
    """'87' or '87 %' -> 87.0; a header or blank line -> None."""
    text = line.strip().rstrip("%").strip()
    try:
        return float(text)
    except ValueError:
        return None


class UtilizationSampler:
    def __init__(self, enabled: bool = True, interval_s: float = 0.1, device: str | None = None,
                 nvidia_smi: str | None = "nvidia-smi"):
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} must be > 0")
        self.enabled, self.interval_s, self.device = enabled, interval_s, device or visible_gpu()
        self.nvidia_smi = shutil.which(nvidia_smi) if nvidia_smi else None
        self.source = "n/a"
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "UtilizationSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.enabled:
            return
        handle = self._nvml_handle()
        if handle is not None:
            self.source, target, args = "nvml", self._poll_nvml, (handle,)
        elif self.nvidia_smi:
            # a pseudo-terminal as stdout: C stdio line-buffers a tty, so every sample arrives as it is taken
            reader, writer = pty.openpty()
            self._process = subprocess.Popen(
                [self.nvidia_smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"--loop-ms={max(1, round(self.interval_s * 1e3))}", f"--id={self.device}"],
                stdout=writer, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            os.close(writer)
            self.source, target, args = "nvidia-smi", self._read_nvidia_smi, (reader,)
        else:
            return
        self._thread = threading.Thread(target=target, args=args, name="gpu-utilization", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)  # how nvidia-smi's loop is meant to end (Ctrl+C)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # SIGINT ignored (inherited, e.g. under a background shell): end it
                self._process.kill()
                self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "gpu_util_samples": 0,
                    "gpu_util_source": "n/a" if self.source == "n/a" else f"{self.source} (no samples)"}
        return {"gpu_util_mean_pct": sum(self.samples) / len(self.samples), "gpu_util_max_pct": max(self.samples),
                "gpu_util_samples": len(self.samples), "gpu_util_source": self.source}

    # ------------------------------------------------------------------ sources
    def _nvml_handle(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            if self.device.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(self.device))
            return pynvml.nvmlDeviceGetHandleByUUID(self.device)
        except Exception:  # not installed, no driver, unknown device: fall back to nvidia-smi
            return None

    def _poll_nvml(self, handle) -> None:
        import pynvml

        while not self._stop.is_set():
            self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            self._stop.wait(self.interval_s)

    def _read_nvidia_smi(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as stream:
            pending = b""
            while True:
                try:
                    chunk = stream.read(4096)
                except OSError:  # EIO: the process ended and closed the terminal
                    chunk = b""
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    value = parse_utilization(line.decode(errors="replace"))
                    if value is not None:
                        self.samples.append(value)
