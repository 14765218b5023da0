package main

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// podFailoverRes is the workload failover measured on the local cluster
// (real kubelets): end-to-end story 16 run -runs times on one cluster.
type podFailoverRes struct {
	Measured time.Time
	Commit   string
	// Seconds: the writer's node (which also runs the Pod) is killed →
	// the Pod's first record acknowledged on the other member.
	Seconds []float64
	// Records says, per run, how many acknowledged records the Pod had
	// written before the loss and how many it found after.
	Records []string
	// Breakdowns: when each step happened, per run (story 16's log).
	Breakdowns []string
	Errors     []string
}

// story16RE matches the figure story 16 logs.
var (
	story16RE          = regexp.MustCompile(`STORY 16 pod failover: .* in ([0-9.]+)s; (.*)$`)
	story16BreakdownRE = regexp.MustCompile(`STORY 16 breakdown: (.*)$`)
)

// runPodFailover brings the local cluster up (root: network namespaces),
// runs story 16 b.runs times on it, and takes it down.
func (b *bench) runPodFailover() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: the local cluster's nodes are network namespaces")
	}
	// One local cluster at a time (the lock make test-e2e takes); the fd is
	// close-on-exec, so the cluster's processes do not keep it.
	lock, err := os.OpenFile("/tmp/tandem-cluster.lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	b.logln("waiting for the local cluster lock")
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("cluster lock: %w", err)
	}
	lc := filepath.Join(b.root, "hack", "local-cluster.sh")
	b.logln("local cluster up (make image first if the images are missing)")
	if out, err := exec.Command("make", "-s", "build", "image").CombinedOutput(); err != nil {
		return fmt.Errorf("make build image: %v\n%s", err, out)
	}
	if out, err := exec.Command(lc, "up").CombinedOutput(); err != nil {
		_ = exec.Command(lc, "down").Run()
		return fmt.Errorf("local-cluster up: %v\n%s", err, out)
	}
	defer func() {
		if out, err := exec.Command(lc, "down").CombinedOutput(); err != nil {
			b.logln("local-cluster down: %v\n%s", err, out)
		}
	}()
	res := &b.res.PodFailover
	*res = podFailoverRes{Measured: time.Now().UTC(), Commit: gitCommit(b.root)}
	kubectl := filepath.Join(b.root, "bin", "kubectl")
	kubeconfig := filepath.Join(b.root, ".local", "kubeconfig")
	for i := range b.runs {
		// The previous run's namespace is still going away.
		for range 90 {
			if exec.Command(kubectl, "--kubeconfig", kubeconfig, "get", "namespace", "e2e-teststory16podfollowswriter").Run() != nil {
				break
			}
			time.Sleep(2 * time.Second)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		cmd := exec.CommandContext(ctx, "go", "test", "-tags", "e2e", "-count=1", "-timeout", "14m", "-v", "-run", "^TestStory16", "./test/e2e/")
		cmd.Env = append(os.Environ(), "TANDEM_E2E_REUSE=1")
		out, err := cmd.CombinedOutput()
		cancel()
		found := false
		for _, l := range strings.Split(string(out), "\n") {
			if m := story16RE.FindStringSubmatch(l); m != nil {
				s, _ := strconv.ParseFloat(m[1], 64)
				res.Seconds = append(res.Seconds, s)
				res.Records = append(res.Records, m[2])
				found = true
				b.logln("pod failover run %d: %.2f s (%s)", i+1, s, m[2])
			}
			if m := story16BreakdownRE.FindStringSubmatch(l); m != nil {
				res.Breakdowns = append(res.Breakdowns, m[1])
				b.logln("pod failover run %d: %s", i+1, m[1])
			}
		}
		if err != nil || !found {
			msg := fmt.Sprintf("run %d: %v: %s", i+1, err, lastLines(string(out), 20))
			res.Errors = append(res.Errors, msg)
			b.logln("pod failover %s", msg)
		}
	}
	if len(res.Seconds) == 0 {
		return fmt.Errorf("no run measured a pod failover: %s", strings.Join(res.Errors, "; "))
	}
	return nil
}

func gitCommit(root string) string {
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// reportPodFailover writes the section.
func reportPodFailover(p func(string, ...any), r *results) {
	p("## Pod failover (CSI)\n\n")
	pf := r.PodFailover
	if len(pf.Seconds) == 0 {
		p("(no result: %s; `go run ./hack/bench -only podfailover -update` measures it as root)\n\n", sectionErr(r, "podfailover"))
		return
	}
	p("The local cluster (real kubelets, containerd, scheduler and controller-manager; default failover settings: probe 2 s, 3 failures, Lease 6 s): ")
	p("end-to-end story 16, run %d times on one cluster (commit %s, %s). A StatefulSet's Pod writes numbered records to ext4 on a Tandem volume (Sync) on the writer's node; ", len(pf.Seconds), pf.Commit, pf.Measured.Format("2006-01-02 15:04 UTC"))
	p("that node is killed (every process of it frozen and killed, its link cut); the time is until the Pod, recreated on the promoted member, has its next record acknowledged: ")
	p("failover of the pair, fencing the lost node, the Pod's deletion, scheduling, staging (the fence to the new node, attach, mount) and the container's start included. ")
	p("Goal ≤ 15 s; piraeus-ha-controller starts DRBD's pod failover after about 10 s; Kubernetes alone takes about 6 minutes (eviction, then the 6-minute force-detach).\n\n")
	s := summarize(pf.Seconds)
	times := make([]string, len(pf.Seconds))
	for i, x := range pf.Seconds {
		times[i] = ff(x, 2)
	}
	records := make([]string, len(pf.Records))
	for i, r := range pf.Records {
		records[i] = r
		if m := recordsRE.FindStringSubmatch(r); m != nil {
			records[i] = m[2] + "/" + m[1]
		}
	}
	p("| runs | min s | median s | max s | individual times s | acknowledged records intact after |\n|---|---|---|---|---|---|\n")
	p("| %d | %s | %s | %s | %s | %s |\n", s.N, ff(s.Min, 2), ff(s.Med, 2), ff(s.Max, 2), strings.Join(times, " "), oneLine(strings.Join(records, " ")))
	for _, e := range pf.Errors {
		p("| | failed run: %s | | | | |\n", oneLine(e))
	}
	p("\n")
	if len(pf.Breakdowns) > 0 {
		p("When each step happened, per run (seconds after the kill):\n\n")
		for i, bd := range pf.Breakdowns {
			p("%d. %s\n", i+1, bd)
		}
		p("\n")
	}
	if a := strings.TrimSpace(podFailoverAnalysis); a != "" {
		p("%s\n\n", a)
	}
}

// recordsRE reads story 16's "N records acknowledged before, M intact after".
var recordsRE = regexp.MustCompile(`^(\d+) records acknowledged before, (\d+) intact after$`)

// podFailoverAnalysis explains the figures (written after looking at the
// breakdowns).
//
//go:embed podfailover.md
var podFailoverAnalysis string
