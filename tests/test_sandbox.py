"""Sandbox profiles: loading, validation, refusing what the kernel cannot enforce."""
from __future__ import annotations

import os

import pytest

from runtime import profile as profiles
from runtime import sandbox
from runtime.sandbox import Features, SandboxUnavailable
from core.config import ConfigError

from conftest import wait_until

EVERYTHING = Features(root=True, landlock_abi=7, seccomp=True, cgroups=True)


def write(tmp_path, name, text):
    folder = tmp_path / "sandbox_profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(text)


@pytest.mark.parametrize("name", ["default", "strict", "trusted"])
def test_shipped_profiles_load_and_run_here(tmp_path, name):
    profile = profiles.load(name, tmp_path)
    sandbox.check(profile, sandbox.probe())  # this machine has every feature they need


def test_shipped_profiles_say_what_the_design_says(tmp_path):
    default, strict, trusted = (profiles.load(n, tmp_path) for n in ("default", "strict", "trusted"))
    assert (default.network, default.writable, default.isolation) == ("local", (), "copy")
    assert (strict.network, strict.readable, strict.writable, strict.isolation) == \
        ("none", (), (), "fork")
    assert (trusted.network, trusted.seccomp, trusted.user, trusted.uses_landlock) == \
        ("any", False, 0, False)


def test_profile_beside_the_config_comes_first(tmp_path):
    write(tmp_path, "default", "wall_seconds = 1.5\n")
    assert profiles.load("default", tmp_path).wall_seconds == 1.5


@pytest.mark.parametrize("text, words", [
    ("wall_secondz = 1\n", "unknown key 'wall_secondz'"),
    ("isolation = 'vm'\n", "isolation must be one of none, copy, fork"),
    ("network = 'lan'\n", "network must be one of none, local, any"),
    ("memory_mb = 0\n", "memory_mb must be > 0"),
    ("processes = 'many'\n", "processes must be int"),
    ("readable = '/usr'\n", "readable must be a list"),
    ("seccomp = 1\n", "seccomp must be bool"),
    ("user = -5\n", "user must be a uid"),
    ("name = 'x'\n", "unknown key 'name'"),
    ("wall_seconds = \n", "not valid TOML"),
])
def test_bad_profiles_name_the_key(tmp_path, text, words):
    write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as err:
        profiles.load("bad", tmp_path)
    assert words in str(err.value)
    assert "bad.toml" in str(err.value)


def test_relative_paths_are_relative_to_the_profile(tmp_path):
    write(tmp_path, "p", "readable = ['data', '/usr']\n")
    assert profiles.load("p", tmp_path).readable == (str(tmp_path / "sandbox_profiles/data"), "/usr")


@pytest.mark.parametrize("features, text, words", [
    (Features(True, 7, False, True), "seccomp = true\n", "needs seccomp"),
    (Features(True, 0, True, True), "readable = []\n", "needs Landlock ABI 6 for file allow-lists"),
    (Features(True, 5, True, True), "readable = ['/']\nwritable = ['/']\nnetwork = 'local'\n",
     "network = 'local'"),
    (Features(True, 3, True, True), "readable = ['/']\nwritable = ['/']\nnetwork = 'none'\n",
     "this kernel has ABI 3"),
])
def test_a_profile_the_kernel_cannot_enforce_is_refused(tmp_path, features, text, words):
    write(tmp_path, "p", text)
    profile = profiles.load("p", tmp_path)
    sandbox.check(profile, EVERYTHING)
    with pytest.raises(SandboxUnavailable) as err:
        sandbox.check(profile, features)
    assert words in str(err.value) and "'p'" in str(err.value)


def test_limits_only_needs_nothing_from_the_kernel(tmp_path):
    sandbox.check(profiles.load("trusted", tmp_path), Features(False, 0, False, False))


def test_node_refuses_to_start_with_a_profile_it_cannot_honour(make_cluster):
    cluster = make_cluster(pool={"profile": "broken"})
    write(cluster.root, "broken", "imports = ['no_such_module_for_srw']\n")
    proc = cluster.serve(wait=False)
    assert proc.wait(30) != 0
    err = proc.stderr.read().decode()
    assert "refuses to start" in err and "no_such_module_for_srw" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="uids per runner and cgroups need root")
def test_each_runner_has_its_own_uid_and_cgroups_workers_stay_out(shared_node):
    with shared_node.client() as c:
        seen = [c.exec("", code="import os\n__return_data = repr((os.getuid(), "
                                 "os.getgroups(), os.getpid()))").data for _ in range(6)]
    # Per worker a spare; the worker(s) that ran the requests keep this tenant's warm.
    def three_or_more():
        runners = shared_node.runners()
        return runners if len(runners) >= 3 else None
    runners = wait_until(three_or_more, 5, "a spare per worker and a warm runner")
    uids = sorted(r.uids().real for r in runners)
    block = uids[0] // 1000 * 1000
    assert len(set(uids)) == len(uids) and block >= 61000
    assert all(block < uid < block + 1000 for uid in uids)
    seen = [eval(x) for x in seen]
    assert all(block < uid < block + 1000 and groups == [] for uid, groups, _ in seen)
    # The last one's runner is kept warm (an earlier one may have been turned away
    # when the caller already held its share of warm runners: tenants.py).
    assert (seen[-1][0], seen[-1][2]) in {(r.uids().real, r.pid) for r in runners}
    for runner in runners:
        zygote = runner.parent()
        assert zygote.cmdline()[0].startswith("srw: zygote n1#")
        for proc, caps, where in ((runner, "0000000000000000", "/seat"),
                                  (zygote, "00000000000000e0", "/slot")):  # SETUID, SETGID, KILL
            status = open(f"/proc/{proc.pid}/status").read()
            assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
            assert f"CapEff:\t{caps}" in status and f"CapPrm:\t{caps}" in status
            cgroups = open(f"/proc/{proc.pid}/cgroup").read()
            assert all(f"{c}:/srw-n1-" in cgroups for c in ("memory", "pids", "cpuacct"))
            assert where in cgroups.split("pids:", 1)[1].splitlines()[0]
        assert "CapBnd:\t00000000000000e0" in open(f"/proc/{zygote.pid}/status").read()
    for worker in shared_node.workers():  # trusted: root, no filter, outside the slot's limits
        assert worker.uids().real == 0
        assert "Seccomp:\t0" in open(f"/proc/{worker.pid}/status").read()
        assert "/srw-n1-" not in open(f"/proc/{worker.pid}/cgroup").read()


def test_seccomp_denies_terminal_injection_even_on_a_terminal_the_script_holds():
    """Defence in depth: a runner never holds a terminal, and if it did, TIOCSTI
    and TIOCLINUX would be denied anyway."""
    import ctypes
    import errno
    import pty

    from runtime import seccomp
    master, slave = pty.openpty()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            seccomp.zygote_filter("none").load()
            libc = ctypes.CDLL(None, use_errno=True)
            pushed = libc.ioctl(slave, 0x5412, ctypes.byref(ctypes.c_char(b"x")))
            code = 0 if pushed != 0 and ctypes.get_errno() == errno.EPERM else 2
        finally:
            os._exit(code)
    try:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        os.set_blocking(slave, False)
        with pytest.raises(BlockingIOError):
            os.read(slave, 10)  # nothing was pushed
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.skipif(os.geteuid() != 0, reason="the zygote runs as root with its capabilities dropped")
def test_zygote_waits_out_the_kernels_cap_on_descriptors_in_flight(make_cluster):
    """A runner's pipe ends go from the zygote to the worker over a unix socket,
    which the kernel refuses (ETOOMANYREFS) while more descriptors than the
    sender's open_files are in flight for its user (uid 0: any root process of
    the machine; under a loaded suite it happened).  The zygote used to die of
    it, and its worker's next requests failed; now it tries again later."""
    import socket

    from runtime.isolation import FORK_SPARES
    cluster = make_cluster(pool={"profile": "strict", "workers": 1})  # open_files 64
    cluster.serve()
    worker = cluster.workers()[0].pid
    wait_until(lambda: len(cluster.runners()) >= FORK_SPARES, 15, "the zygote's spares")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with open(os.devnull) as null, cluster.client() as c:
            socket.send_fds(a, [b"held"], [null.fileno()] * 100)  # root's count past 64
            # A spare (or, if one was still on its way, no runner in time); the
            # runner forked in its place cannot be handed over yet.
            assert c.exec("echo.py", b"taken", timeout=3).status in ("ok", "timeout")
            wait_until(lambda: "cannot hand a runner to the worker yet" in cluster.log()
                       or not cluster.processes("srw: zygote n1#"), 10,
                       "the zygote's warning (or its end)")
            a.close()
            b.close()  # nothing in flight any more
            for i in range(12):  # more than the spares forked before: new ones get through
                r = c.exec("echo.py", b"%d" % i)
                assert (r.status, r.data) == ("ok", b"%d" % i), r.error
    finally:
        a.close()
        b.close()
    assert [w.pid for w in cluster.workers()] == [worker]
    assert "the zygote of n1#1 failed" not in cluster.log()
    assert "cannot hand a runner to the worker yet" in cluster.log()
