package main

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// The load suite (test/e2e/load_test.go, TestLoad) logs one summary line:
//
//	LOAD pairs=16 duration=10m0s fault=kill-node node=node-a affected=6 failover_s_max=4.2 iops_total=2210 rate_iops=100
//	  fio_errors_window=6 fio_errors_outside=0 converge_s=4.1 differing=0 delete_s=3.2 files_left=0
//	  manager:rss_mib=40/61:rss_warm_end_mib=52/55:goroutines=120/180/121 agent-node-a:...
var loadRE = regexp.MustCompile(`LOAD (pairs=.*)$`)

type loadRun struct {
	step  string
	kv    map[string]string
	procs [][2]string // process, its colon-separated figures
}

func parseLoad(path, stepName string) ([]loadRun, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []loadRun
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		m := loadRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		r := loadRun{step: stepName, kv: map[string]string{}}
		for _, tok := range strings.Fields(m[1]) {
			if name, figs, ok := strings.Cut(tok, ":"); ok {
				r.procs = append(r.procs, [2]string{name, figs})
			} else if k, v, ok := strings.Cut(tok, "="); ok {
				r.kv[k] = v
			}
		}
		out = append(out, r)
	}
	return out, sc.Err()
}

// loadSection writes the "Load" section for the steps whose logs hold a LOAD line.
func loadSection(p func(string, ...any), in string, steps []step) error {
	var runs []loadRun
	for _, s := range steps {
		if s.kind != "suite" {
			continue
		}
		r, err := parseLoad(filepath.Join(in, s.log), s.name)
		if err != nil {
			return err
		}
		runs = append(runs, r...)
	}
	if len(runs) == 0 {
		return nil
	}
	p("## Load\n\n")
	p("16 VolumePairs (Async and Sync mixed, 64 MiB; failover settings per run below: default is the VolumePair defaults, probe 2 s × 3 and Lease 6 s) on the three-node local cluster with one rate-limited fio (ioengine=nbd, 4 KiB random, 70%% writes) per pair; one node, primary of several pairs, is killed in the middle and restored. ")
	p("Checked (test/e2e/load_test.go): every pair whose primary was killed served by its backup within the bound below (15 s: six pairs fail over at once on a saturated two-CPU machine; the 10 s failover target is per pair, see docs/benchmarks.md); every pair back in sync on its primary with identical replicas; fio I/O errors only on the pairs whose primary was killed, between the kill and 10 s after their failback to the restored primary; RSS at the end ≤ 2 × RSS after warm-up + 64 MiB per process; goroutines back to the count before the pairs were created (+10; taken after one pair was created and deleted; the manager's idle keep-alive connections to the agents not counted) once they are deleted; replicas removed on deletion (kept with the retain-data annotation).\n\n")
	p("| step | duration | fault | pairs (affected) | failover settings | failover s (slowest / bound) | IOPS total | fio errors in window / outside | converge s | differing replicas | files left |\n|---|---|---|---:|---|---:|---:|---|---:|---:|---:|\n")
	for _, r := range runs {
		kv := r.kv
		settings, bound := kv["failover"], kv["failover_bound_s"]
		if settings == "" { // lines from before the setting was reported
			settings, bound = "tight", "10"
		}
		p("| %s | %s | %s %s | %s (%s) | %s | %s / %s | %s | %s / %s | %s | %s | %s |\n", r.step, kv["duration"], kv["fault"], kv["node"], kv["pairs"], kv["affected"],
			settings, kv["failover_s_max"], bound, kv["iops_total"], kv["fio_errors_window"], kv["fio_errors_outside"], kv["converge_s"], kv["differing"], kv["files_left"])
	}
	p("\n| step | process | RSS min / max MiB | RSS after warm-up → end MiB | goroutines before / peak / after deletion |\n|---|---|---|---|---|\n")
	for _, r := range runs {
		for _, pr := range r.procs {
			figs := map[string]string{}
			for _, f := range strings.Split(pr[1], ":") {
				if k, v, ok := strings.Cut(f, "="); ok {
					figs[k] = v
				}
			}
			p("| %s | %s | %s | %s | %s |\n", r.step, pr[0], strings.ReplaceAll(figs["rss_mib"], "/", " / "),
				strings.ReplaceAll(figs["rss_warm_end_mib"], "/", " → "), strings.ReplaceAll(figs["goroutines"], "/", " / "))
		}
	}
	p("\n")
	return nil
}
