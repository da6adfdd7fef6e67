"""What a node reports about itself: status fields, `srw status --scripts`,
Prometheus /metrics and the status page in a real headless browser.

Pure counting first (broker/stats.py), then one node behind `srw serve` and
its proxy, shared by the module; the down-node case runs a proxy alone.
"""
from __future__ import annotations

import json
import time
import threading

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import core
from broker import stats
from broker.stats import ExecStats, bucket_quantile, restart_cause
from conftest import Cluster, proxy_url, serving_with_proxy, wait_proxy, wait_until
from conftest import proxy_request as request

SCRIPTS = {"fail.py": "raise ValueError('counted as script_error')\n",
           "slow.py": "import time\ntime.sleep(1.0)\n"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_WAIT = 15.0  # seconds for any one thing the browser does


# Counting (no processes) -----------------------------------------------------------

def test_exec_stats_count_by_script_and_status_and_time_only_ok_replies():
    s = ExecStats(max_scripts=3, window=4)
    for latency in (100, 300, 700, 400_000_000):
        s.record("echo.py", "ok", latency)
    s.record("echo.py", "timeout", 5_000_000)
    s.record("", "ok", 200)
    s.record("a.py", "script_error", 10)
    s.record("b.py", "ok", 10)  # a fourth name: past max_scripts
    snap = s.snapshot()
    echo = snap["scripts"]["echo.py"]
    assert echo["statuses"] == {"ok": 4, "timeout": 1}
    # Buckets are per bucket, not cumulative: <=250, <=500, <=1000, ..., +Inf.
    assert echo["buckets"][:3] == [1, 1, 1] and echo["buckets"][-1] == 1
    assert sum(echo["buckets"]) == 4 and echo["sum_us"] == 100 + 300 + 700 + 400_000_000
    assert snap["scripts"][stats.CONTENT]["statuses"] == {"ok": 1}
    assert snap["scripts"][stats.OTHER]["statuses"] == {"ok": 1}
    assert snap["statuses"] == {"ok": 6, "timeout": 1, "script_error": 1}
    # The window holds the last 4 ok replies; the timeout is not among them.
    assert snap["latency_window"] == {"ok_replies": 4, "limit": 4}
    assert snap["latency_us"]["p99"] == 400_000_000 and 5_000_000 not in s.ok_latencies


def test_restart_causes_are_short_and_bounded():
    assert restart_cause("killed by SIGKILL") == "killed by SIGKILL"
    assert restart_cause("exited with status 3") == "exited with status 3"
    assert restart_cause("request ran past its deadline (wall limit 5 s or the "
                         "request timeout)") == "timeout"
    assert restart_cause("request used more than 2 s of CPU") == "cpu limit"
    assert restart_cause("stopped by SIGSTOP; killed by the pool") == "stopped by SIGSTOP"
    assert restart_cause("recycled") == "recycled" and restart_cause("") == "unknown"
    s = ExecStats()
    s.restarted("retired")  # by a reload or resize: no successor, no restart
    assert s.restart_causes == {}
    for i in range(stats.MAX_CAUSES + 5):
        s.restarted(f"exited with status {i}")
    assert len(s.restart_causes) == stats.MAX_CAUSES + 1 and s.restart_causes["other"] == 5


def test_bucket_quantile_interpolates_within_a_bucket():
    bounds = [100, 200, 400]
    assert bucket_quantile([0, 0, 0, 0], bounds, 0.5) is None
    assert bucket_quantile([0, 10, 0, 0], bounds, 0.5) == 150
    assert bucket_quantile([10, 0, 0, 0], bounds, 0.99) == 99
    assert bucket_quantile([1, 0, 0, 99], bounds, 0.99) == 400  # in +Inf: the last bound


# One node behind the proxy ----------------------------------------------------------

@pytest.fixture(scope="module")
def web(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("metrics"), [{"name": "n1"}], {"workers": 2},
                      {"request_timeout": 5.0}, SCRIPTS, None)
    with serving_with_proxy(cluster):
        yield cluster


def scrape(cluster: Cluster) -> dict:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    status, headers, body = request(cluster, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def node_status(cluster: Cluster) -> dict:
    status, headers, body = request(cluster, "GET", "/status?format=json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    return json.loads(body)["nodes"][0]


def worker_pids(cluster: Cluster) -> set[int]:
    return {w.pid for w in cluster.workers()}


def test_metrics_count_executions_by_script_and_status(web):
    node = {"node": "n1", "group": "1"}
    before = scrape(web)
    for i in range(7):
        assert request(web, "POST", "/elliptics?exec&name=echo.py", b"m%d" % i)[0] == 200
    for _ in range(2):
        assert request(web, "POST", "/elliptics?exec&name=fail.py", b"")[0] == 500
    after = scrape(web)

    def rose(name, **labels):
        return sample(after, name, **node, **labels) - sample(before, name, **node, **labels)
    assert rose("srw_executions_total", script="echo.py", status="ok") == 7
    assert rose("srw_executions_total", script="fail.py", status="script_error") == 2
    assert rose("srw_exec_latency_seconds_count", script="echo.py") == 7
    assert rose("srw_exec_latency_seconds_bucket", script="echo.py", le="+Inf") == 7
    assert rose("srw_exec_latency_seconds_count", script="fail.py") == 0  # errors: not timed
    assert sample(after, "srw_proxy_http_requests_total", method="POST", path="/elliptics",
                  code="200") - sample(before, "srw_proxy_http_requests_total", method="POST",
                                       path="/elliptics", code="200") == 7
    assert sample(after, "srw_node_up", **node) == 1
    assert sample(after, "srw_node_info", **node, version=core.__version__) == 1
    started = sample(after, "srw_start_time_seconds", **node)
    assert abs(started - sample(before, "srw_start_time_seconds", **node)) < 1 and \
        time.time() - 600 < started < time.time()
    timed = "srw_proxy_http_request_duration_seconds_count"
    assert sample(after, timed, method="POST", path="/elliptics") - \
        sample(before, timed, method="POST", path="/elliptics") == 9
    assert sample(after, "process_resident_memory_bytes") > 0  # the proxy's own
    assert sample(after, "process_start_time_seconds") > 0
    assert sample(after, "srw_workers", **node) == 2
    assert sample(after, "srw_queue_depth", **node) == 0
    # Worker series are keyed by slot (a reload adds none); srw_worker_info maps slot -> pid.
    pids = {dict(labels)["slot"]: int(dict(labels)["pid"]) for (name, labels), _ in after.items()
            if name == "srw_worker_info"}
    uss = {dict(labels)["slot"] for (name, labels), value in after.items()
           if name == "srw_worker_uss_bytes" and dict(labels)["process"] == "worker"
           and value > 0}
    assert set(pids.values()) == worker_pids(web) and uss == set(pids)
    assert not any("pid" in dict(labels) for (name, labels) in after
                   if name == "srw_worker_uss_bytes")


def test_a_replaced_worker_is_counted_by_cause(web):
    def killed():
        return node_status(web)["restart_causes"].get("killed by SIGKILL", 0)
    before = killed()
    victim = web.workers()[0]
    victim.kill()
    wait_until(lambda: killed() == before + 1 and node_status(web)["workers"] == 2, 15,
               "the replacement registered")
    assert sample(scrape(web), "srw_worker_restarts_total", node="n1", group="1",
                  cause="killed by SIGKILL") == before + 1
    assert victim.pid not in {r["pid"] for r in node_status(web)["worker_rows"]}


def test_status_json_has_version_uptime_window_and_a_row_per_worker(web):
    first = node_status(web)
    assert first["version"] == core.__version__
    status, _, body = request(web, "GET", "/status", headers={"Accept": "application/json"})
    assert json.loads(body)["version"] == core.__version__
    rows = first["worker_rows"]
    assert {r["pid"] for r in rows} == worker_pids(web)
    assert sorted(r["slot"] for r in rows) == [1, 2]
    assert all(r["uss"] > 0 and r["sandbox_uss"] > 0 for r in rows)
    assert first["latency_window"]["limit"] == stats.LATENCY_WINDOW
    # While slow.py runs, its worker is busy with it, and the request is not yet served.
    slow = threading.Thread(target=request, args=(web, "POST", "/elliptics?exec&name=slow.py"))
    slow.start()
    try:
        busy = wait_until(lambda: [r for r in node_status(web)["worker_rows"]
                                   if r["state"] == "busy" and r["script"] == "slow.py"],
                          5, "a worker busy with slow.py")
        assert busy[0]["pid"] in worker_pids(web)
    finally:
        slow.join(10)
    later = node_status(web)
    assert later["uptime"] > first["uptime"]
    assert later["scripts"]["slow.py"]["statuses"] == {"ok": 1}
    assert sum(r["served"] for r in later["worker_rows"]) >= \
        sum(r["served"] for r in rows) + 1
    assert {r["state"] for r in later["worker_rows"]} == {"idle"}


def test_client_chosen_names_are_escaped_on_the_page_and_the_cli(web):
    # HTTP refuses such a name; a ZeroMQ client reaches the broker, which counts it.
    with web.client(timeout=5) as client:
        assert client.exec("<b>x\x1b[31m").status == "bad_request"
    status, headers, body = request(web, "GET", "/status")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"&lt;b&gt;x" in body and b"<b>x" not in body
    out = web.run("status", "--scripts")
    assert out.returncode == 0
    assert b"'<b>x\\x1b[31m'" in out.stdout and b"\x1b" not in out.stdout


def test_status_scripts_prints_executions_by_status_with_percentiles(web):
    with web.client(timeout=5) as client:
        for _ in range(3):
            assert client.exec("fail.py").status == "script_error"
        assert client.exec("echo.py", b"x").ok
    counts = node_status(web)["scripts"]
    out = web.run("status", "--scripts")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert "uptime" in lines[0] and "last ok replies" in lines[2]
    header = next(i for i, line in enumerate(lines) if line.startswith("script "))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:]}
    echo, fail = rows["echo.py"], rows["fail.py"]
    assert int(echo[1]) == int(echo[2]) == counts["echo.py"]["statuses"]["ok"]
    assert int(echo[3]) > 0 and int(echo[4]) >= int(echo[3])  # p50, p99 in us
    failed = counts["fail.py"]["statuses"]["script_error"]
    assert failed >= 3 and fail[1:5] == [str(failed), "0", "-", "-"]
    assert " ".join(fail[5:]) == f"script_error {failed}"


def test_bad_status_queries_are_refused(web):
    for query in ("refresh=-1", "refresh=abc", "refresh=99999", "format=xml", "color=red"):
        status, _, body = request(web, "GET", f"/status?{query}")
        assert status == 400, (query, body)


# A node that does not answer -------------------------------------------------------

def test_a_node_that_does_not_answer_is_up_0(make_cluster):
    cluster = make_cluster(nodes=({"name": "n1"}, {"name": "n2", "group": 2}))
    cluster.srw("proxy")  # the proxy alone: neither node runs
    wait_proxy(cluster)
    metrics = scrape(cluster)
    for name, group in (("n1", "1"), ("n2", "2")):
        assert sample(metrics, "srw_node_up", node=name, group=group) == 0
        assert ("srw_workers", (("group", group), ("node", name))) not in metrics
    status, _, body = request(cluster, "GET", "/status")
    assert status == 200 and b"node n2 (group 2)" in body and b"does not answer" in body


# The page in a real browser ----------------------------------------------------------

@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Debian's chromium, headless, driven by selenium through Debian's chromedriver;
    at teardown the browser quits and every process it started is gone."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must fetch nothing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(BROWSER_WAIT)
    tree = [psutil.Process(service.process.pid)]
    tree += tree[0].children(recursive=True)
    try:
        yield driver
    finally:
        driver.quit()
        for proc in tree:
            try:
                proc.wait(BROWSER_WAIT)
            except psutil.TimeoutExpired:
                proc.kill()
        assert not [p.pid for p in tree if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE], "browser processes left"


def test_status_page_in_a_browser_shows_workers_and_refreshes_itself(web, browser):
    from selenium.common.exceptions import (NoSuchElementException,
                                            StaleElementReferenceException)
    from selenium.webdriver.common.by import By
    browser.get(proxy_url(web, "/status?refresh=1"))

    def page():
        """{pid: served} of the rendered worker rows; {} while the page reloads."""
        try:
            rows = browser.find_elements(By.CSS_SELECTOR, "section[data-node=n1] tr.worker")
            return {int(r.get_attribute("data-pid")):
                    int(r.find_element(By.CSS_SELECTOR, "td.served").text) for r in rows}
        except (StaleElementReferenceException, NoSuchElementException):
            return {}

    shown = page()
    assert set(shown) == worker_pids(web)
    heading = browser.find_element(By.CSS_SELECTOR, "section[data-node=n1] h2").text
    assert heading == "node n1 (group 1)" and core.__version__ in browser.page_source
    browser.execute_script("window.loadedBefore = true")  # gone once the page reloads
    with web.client(timeout=5) as client:
        for i in range(10):
            assert client.exec("echo.py", b"%d" % i).ok
    wait_until(lambda: sum(page().values()) >= sum(shown.values()) + 10, BROWSER_WAIT,
               "the page to show the 10 new requests", interval=0.2)
    assert browser.execute_script("return window.loadedBefore === undefined")
