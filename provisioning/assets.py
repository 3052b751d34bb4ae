"""Copies of systemd/cv-worker.service and systemd/99-cv-worker-accelerators.rules for installs from a wheel,
which has no systemd/ directory. tests/test_provisioning.py fails when they drift from the files in systemd/."""

from pathlib import Path

_REPO_SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"

UNIT = r'''# cv-worker agent. Installed by `cv-worker provision` or the Ansible role; check with
#   systemd-analyze verify cv-worker.service && systemd-analyze security --offline=yes cv-worker.service
[Unit]
Description=cv-worker computer-vision edge agent
Documentation=https://github.com/cv-worker/cv-worker/blob/main/docs/deployment.md
Wants=network-online.target
After=network-online.target mosquitto.service
# Give up after 5 failed starts in 5 minutes instead of looping forever; `systemctl reset-failed` re-arms it.
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
# READY=1 comes once config, state and the MQTT session are up (agent/node.py run_forever).
Type=notify
NotifyAccess=main
ExecStart=/opt/cv-worker/venv/bin/cv-worker run --config /etc/cv-worker/config.toml
Restart=on-failure
RestartSec=3s
# Model imports and the first broker connection can be slow on a Pi.
TimeoutStartSec=120s
# Running jobs get 10 s to reach a checkpoint (engine.stop), then the outbox drains.
TimeoutStopSec=30s
# WATCHDOG=1 is sent only while the intake, engine loops and main loop are alive; a hung agent is
# aborted (SIGABRT, then SIGKILL after TimeoutAbortSec) and restarted by Restart=on-failure.
WatchdogSec=20s
TimeoutAbortSec=10s

User=cv-worker
Group=cv-worker
StateDirectory=cv-worker
StateDirectoryMode=0750
ConfigurationDirectory=cv-worker
ConfigurationDirectoryMode=0750
UMask=0027
Environment=PYTHONUNBUFFERED=1
# Batch inference runs its slower stage (decode or inference process) ahead of the faster one by lowering the
# faster one's priority, and must be able to raise it back when the next model flips them (nice 0 at best,
# never above the agent's own): agent/inference/decodeproc.py, DecodePool.prioritise.
LimitNICE=+0

# --- hardening (systemd-analyze security --offline=yes: see docs/deployment.md) ---
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateIPC=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @obsolete @debug @mount @reboot @swap @module @raw-io @cpu-emulation
SystemCallErrorNumber=EPERM
# AF_NETLINK: interface lists for mDNS (getifaddrs) and libusb hotplug events.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# No PrivateDevices= (it would hide the sticks); instead only these device nodes may be opened.
# The udev rules (99-cv-worker-accelerators.rules) give group cv-worker rw on them.
DevicePolicy=closed
# Coral USB and Movidius NCS/NCS2 through libusb (/dev/bus/usb/BBB/DDD, major 189).
DeviceAllow=char-usb_device rw
# Coral PCIe/M.2 (/dev/apex_N).
DeviceAllow=char-apex rw
# Not set on purpose: MemoryDenyWriteExecute= (OpenVINO's CPU plugin JIT-compiles kernels),
# ProcSubset=pid (runtimes read /proc/cpuinfo and /proc/meminfo), PrivateNetwork= (MQTT, mDNS).

[Install]
WantedBy=multi-user.target
'''

UDEV_RULES = r'''# cv-worker: give the agent's group (cv-worker) access to inference accelerators.
# Installed to /etc/udev/rules.d/ by `cv-worker provision` or the Ansible role; then
#   udevadm control --reload && udevadm trigger
# The unit's DeviceAllow= list (char-usb_device, char-apex) must match these devices.

# Google Coral USB Accelerator: 1a6e:089a before its firmware is loaded, 18d1:9302 after.
SUBSYSTEM=="usb", ATTRS{idVendor}=="1a6e", ATTRS{idProduct}=="089a", MODE="0660", GROUP="cv-worker"
SUBSYSTEM=="usb", ATTRS{idVendor}=="18d1", ATTRS{idProduct}=="9302", MODE="0660", GROUP="cv-worker"

# Google Coral PCIe / M.2 (gasket/apex driver): /dev/apex_N.
SUBSYSTEM=="apex", MODE="0660", GROUP="cv-worker"

# Intel Movidius Neural Compute Stick (03e7:2150) and NCS2 (03e7:2485); 03e7:f63b is the booted MYRIAD X.
SUBSYSTEM=="usb", ATTRS{idVendor}=="03e7", ATTRS{idProduct}=="2150", MODE="0660", GROUP="cv-worker"
SUBSYSTEM=="usb", ATTRS{idVendor}=="03e7", ATTRS{idProduct}=="2485", MODE="0660", GROUP="cv-worker"
SUBSYSTEM=="usb", ATTRS{idVendor}=="03e7", ATTRS{idProduct}=="f63b", MODE="0660", GROUP="cv-worker"
'''


def unit_text() -> str:
    f = _REPO_SYSTEMD / "cv-worker.service"
    return f.read_text() if f.is_file() else UNIT


def udev_rules_text() -> str:
    f = _REPO_SYSTEMD / "99-cv-worker-accelerators.rules"
    return f.read_text() if f.is_file() else UDEV_RULES
