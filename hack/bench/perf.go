package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

type results struct {
	Baseline          string // -compare revision
	Targets           []string
	Machine           Machine
	Started, Finished time.Time
	Runs              int
	Runtime           time.Duration
	Sections          []sectionTime

	Fio         []fioRow
	Profiles    []profile
	Resync      []resyncRow
	FullCopy    resyncRow
	Scaling     []scaleRow
	Failback    failbackRes
	RSS         []rssRow
	Bitmaps     []benchLine
	Failover    []benchLine
	Backups     []backupsRow
	ThirdResync thirdResync
	// PodFailover is measured on the local cluster (-only podfailover).
	PodFailover podFailoverRes
	Raw         map[string]string `json:"-"` // raw output of the go benchmarks, by section
}

type sectionTime struct {
	Name    string
	Seconds float64
	Err     string
}

type fioRow struct {
	Workload, Target string
	IOPS, MiBs       stat
	P50, P99         stat // µs
	Ratio            stat // IOPS ÷ nbdkit IOPS of the same round
	Errors           []string
}

type profile struct {
	Workload, Side, Top string
}

var workloads = []workload{
	{name: "4K randwrite QD32", rw: "randwrite", bs: "4k", qd: 32},
	{name: "1M seq write QD8", rw: "write", bs: "1M", qd: 8},
	{name: "64K randrw 70/30 QD16", rw: "randrw", bs: "64k", qd: 16, mixed: true},
	{name: "4K randread QD32", rw: "randread", bs: "4k", qd: 32, isRead: true},
}

var targets = []string{"nbdkit", "standalone", "async", "sync"}

const fioVolSize = 1 << 30

// runFio measures the four targets on each workload, rotating the order
// round by round (A B C D, B C D A, ...), then takes CPU profiles of both
// agents during one extra Async-pair run of each workload.
func (b *bench) runFio() error {
	a, bk := b.newAgent("node-a"), b.newAgent("node-b")
	if err := a.start(); err != nil {
		return err
	}
	if err := bk.start(); err != nil {
		return err
	}
	if err := a.put("solo", fioVolSize, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync, Initialize: true}); err != nil {
		return err
	}
	if err := pair(a, bk, "async", fioVolSize, agentapi.ModeAsync, 1); err != nil {
		return err
	}
	if err := pair(a, bk, "sync", fioVolSize, agentapi.ModeSync, 1); err != nil {
		return err
	}
	for _, v := range []string{"async", "sync"} {
		if err := testkit.Wait(30*time.Second, v+" pair in sync", inSync(a, bk, v)); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join(b.work, "peer"), 0o700); err != nil {
		return err
	}
	nk, err := b.startNbdkit(filepath.Join(b.work, "peer", "disk.img"), fioVolSize)
	if err != nil {
		return err
	}
	uri := map[string]string{"nbdkit": nk.url(), "standalone": a.url("solo"), "async": a.url("async"), "sync": a.url("sync")}
	targets := append([]string(nil), targets...)
	if b.baseBin != "" {
		// The baseline's agents: a second pair, same volumes.
		c, d := b.newAgent("base-a"), b.newAgent("base-b")
		c.bin, d.bin = b.baseBin, b.baseBin
		if err := c.start(); err != nil {
			return err
		}
		if err := d.start(); err != nil {
			return err
		}
		if err := c.put("solo", fioVolSize, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync, Initialize: true}); err != nil {
			return err
		}
		for _, m := range []agentapi.Mode{agentapi.ModeAsync, agentapi.ModeSync} {
			v := strings.ToLower(string(m))
			if err := pair(c, d, v, fioVolSize, m, 1); err != nil {
				return err
			}
			if err := testkit.Wait(30*time.Second, v+" baseline pair in sync", inSync(c, d, v)); err != nil {
				return err
			}
		}
		uri["standalone-base"], uri["async-base"], uri["sync-base"] = c.url("solo"), c.url("async"), c.url("sync")
		targets = []string{"nbdkit", "standalone", "standalone-base", "async", "async-base", "sync", "sync-base"}
	}
	b.res.Targets = targets

	for _, w := range workloads {
		type runs struct {
			iops, mibs, p50, p99, ratio []float64
			errs                        []string
		}
		per := map[string]*runs{}
		for _, t := range targets {
			per[t] = &runs{}
		}
		for r := 0; r < b.runs; r++ {
			got := map[string]float64{}
			for i := range targets {
				t := targets[(i+r)%len(targets)]
				if t == "nbdkit" && !processAlive(nk.exited) {
					b.logln("nbdkit exited; restarting it")
					if nk, err = b.startNbdkit(filepath.Join(b.work, "peer", "disk.img"), fioVolSize); err != nil {
						return err
					}
					uri["nbdkit"] = nk.url()
				}
				b.syncAll()
				res, err := fio(uri[t], fioVolSize, w, b.runtime)
				if err != nil {
					b.logln("  %s %s round %d: %v", w.name, t, r+1, err)
					per[t].errs = append(per[t].errs, err.Error())
					continue
				}
				got[t] = res.IOPS
				p := per[t]
				p.iops, p.mibs = append(p.iops, res.IOPS), append(p.mibs, res.MiBs)
				p.p50, p.p99 = append(p.p50, res.P50us), append(p.p99, res.P99us)
				b.logln("  %-22s %-10s round %d: %8.0f IOPS %8.1f MiB/s p50 %6.0fµs p99 %7.0fµs", w.name, t, r+1, res.IOPS, res.MiBs, res.P50us, res.P99us)
			}
			if base := got["nbdkit"]; base > 0 {
				for _, t := range targets {
					if v, ok := got[t]; ok {
						per[t].ratio = append(per[t].ratio, v/base)
					}
				}
			}
		}
		for _, t := range targets {
			p := per[t]
			b.res.Fio = append(b.res.Fio, fioRow{Workload: w.name, Target: t, IOPS: summarize(p.iops), MiBs: summarize(p.mibs),
				P50: summarize(p.p50), P99: summarize(p.p99), Ratio: summarize(p.ratio), Errors: p.errs})
		}
		// One more Async run, profiled on both sides (not counted).
		b.syncAll()
		profs, err := b.profileRun(a, bk, func() error {
			_, err := fio(uri["async"], fioVolSize, w, b.runtime)
			return err
		})
		if err != nil {
			b.logln("  profile of %s: %v", w.name, err)
			continue
		}
		for side, top := range profs {
			b.res.Profiles = append(b.res.Profiles, profile{Workload: w.name, Side: side, Top: top})
		}
	}
	return nil
}

func processAlive(exited chan struct{}) bool {
	select {
	case <-exited:
		return false
	default:
		return true
	}
}

// profileRun takes a CPU profile of the primary and the backup agent while
// run runs, and returns `go tool pprof -top` of each.
func (b *bench) profileRun(p, s *agentProc, run func() error) (map[string]string, error) {
	secs := int(b.runtime.Seconds())
	if secs < 1 {
		secs = 1
	}
	out := map[string]string{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var perr error
	for side, ag := range map[string]*agentProc{"primary": p, "backup": s} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Second) // fio's ramp
			file := filepath.Join(b.work, fmt.Sprintf("cpu-%s-%d.prof", side, time.Now().UnixNano()))
			err := fetch(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", ag.pprof, secs), file)
			var top string
			if err == nil {
				var o []byte
				o, err = exec.Command("go", "tool", "pprof", "-top", "-nodecount=14", b.agentBin, file).Output()
				top = trimPprof(string(o))
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				perr = err
				return
			}
			out[side] = top
		}()
	}
	err := run()
	wg.Wait()
	if err != nil {
		return nil, err
	}
	return out, perr
}

func fetch(url, file string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// trimPprof keeps the summary line and the table of `pprof -top`.
func trimPprof(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "File:") || strings.HasPrefix(l, "Build ID:") || strings.HasPrefix(l, "Type:") ||
			strings.HasPrefix(l, "Time:") || strings.HasPrefix(l, "Showing") || strings.HasPrefix(l, "Dropped") {
			continue
		}
		if strings.TrimSpace(l) == "" {
			continue
		}
		keep = append(keep, strings.ReplaceAll(l, "github.com/tandem-storage/tandem/", ""))
	}
	return strings.Join(keep, "\n")
}
