package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

const resyncVolSize = 4 << 30

type resyncRow struct {
	Label      string
	Pct        float64 // % of regions changed on the acting primary (0: full copy)
	OwnPct     float64 // % written on the old primary while its backup was stopped
	Written    int64   // bytes the changes wrote
	Seconds    stat
	Bytes      stat
	VsFull     stat // time ÷ the full nbdcopy of the same round
	MiBps      stat
	Errors     []string
	VolumeSize int64
}

// writeRegions writes n distinct random 64 KiB regions of an NBD export
// with fio (its random map writes each block once).
func writeRegions(uri string, size int64, n int64) error {
	if n <= 0 {
		return nil
	}
	w := workload{rw: "randwrite", bs: "64k", qd: 16}
	_, err := fio(uri, size, w, 0, "--io_size="+strconv.FormatInt(n*regionSize, 10))
	return err
}

// resyncOnce runs the story of one resync on a fresh volume: A (primary)
// mirrors to B; [merged: B is SIGSTOPped and A writes its own diff]; A's agent
// is killed; B is promoted (SWAP) and pct % of the regions are written on it;
// A's agent restarts and rejoins as backup; B copies the union of the diffs.
// It returns the COPY's duration and bytes; the volume stays on B (acting
// primary) for the caller, who deletes it.
func (b *bench) resyncOnce(a, bk *agentProc, vol string, size int64, pct, ownPct float64) (time.Duration, int64, error) {
	if err := pair(a, bk, vol, size, agentapi.ModeAsync, 1); err != nil {
		return 0, 0, err
	}
	if err := testkit.Wait(30*time.Second, "pair in sync", inSync(a, bk, vol)); err != nil {
		return 0, 0, err
	}
	regions := size / regionSize
	if ownPct > 0 {
		bk.signal(syscall.SIGSTOP)
		err := writeRegions(a.url(vol), size, int64(float64(regions)*ownPct/100))
		a.kill()
		bk.signal(syscall.SIGCONT)
		if err != nil {
			return 0, 0, fmt.Errorf("own diff on the primary: %w", err)
		}
	} else {
		a.kill()
	}
	if err := bk.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 2, Mode: agentapi.ModeAsync, PeerNode: a.node}); err != nil {
		return 0, 0, err
	}
	if err := writeRegions(bk.url(vol), size, int64(float64(regions)*pct/100)); err != nil {
		return 0, 0, fmt.Errorf("changes during SWAP: %w", err)
	}
	if err := a.start(); err != nil {
		return 0, 0, err
	}
	st, err := bk.status(vol)
	if err != nil {
		return 0, 0, err
	}
	before := st.Copy.CopiedBytesTotal
	if err := a.put(vol, size, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 2, Mode: agentapi.ModeAsync, PeerNode: bk.node}); err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	if err := bk.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 2, Mode: agentapi.ModeAsync, PeerNode: a.node, PeerAddress: a.repl}); err != nil {
		return 0, 0, err
	}
	if err := testkit.Wait(10*time.Minute, "resync", inSync(bk, a, vol)); err != nil {
		return 0, 0, err
	}
	d := time.Since(t0)
	st, err = bk.status(vol)
	if err != nil {
		return 0, 0, err
	}
	return d, st.Copy.CopiedBytesTotal - before, nil
}

// fullCopy copies the whole volume from B's export to a file served by
// nbdkit on A's side with nbdcopy (flushed at the end), the naive resync.
func (b *bench) fullCopy(src string, dst *nbdkitProc) (time.Duration, error) {
	t0 := time.Now()
	out, err := exec.Command("nbdcopy", "--flush", src, dst.url()).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("nbdcopy: %v: %s", err, out)
	}
	return time.Since(t0), nil
}

func (b *bench) runResync() error {
	a, bk := b.newAgent("rs-a"), b.newAgent("rs-b")
	if err := a.start(); err != nil {
		return err
	}
	if err := bk.start(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(b.work, "rs-a-copy"), 0o700); err != nil {
		return err
	}
	dst, err := b.startNbdkit(filepath.Join(b.work, "rs-a-copy", "disk.img"), resyncVolSize)
	if err != nil {
		return err
	}
	type cfg struct {
		label       string
		pct, ownPct float64
	}
	cfgs := []cfg{
		{"0.1 % changed", 0.1, 0},
		{"1 % changed", 1, 0},
		{"10 % changed", 10, 0},
		{"1 % changed + 0.1 % own diff of the returning member (merged)", 1, 0.1},
	}
	type acc struct{ secs, bytes, vs, mibps []float64 }
	accs := make([]acc, len(cfgs))
	errs := make([][]string, len(cfgs))
	var full, fullMiBps []float64
	var fullErrs []string
	for r := 0; r < b.runs; r++ {
		var fullT time.Duration
		for i, c := range cfgs {
			vol := fmt.Sprintf("rs%d-%d", r, i)
			b.syncAll()
			d, n, err := b.resyncOnce(a, bk, vol, resyncVolSize, c.pct, c.ownPct)
			if err != nil {
				b.logln("  resync %s round %d: %v", c.label, r+1, err)
				errs[i] = append(errs[i], err.Error())
				if !a.running() {
					_ = a.start()
				}
				a.remove(vol)
				bk.remove(vol)
				continue
			}
			b.logln("  resync %-62s round %d: %7.3f s, %6.1f MiB copied", c.label, r+1, d.Seconds(), float64(n)/(1<<20))
			accs[i].secs = append(accs[i].secs, d.Seconds())
			accs[i].bytes = append(accs[i].bytes, float64(n))
			accs[i].mibps = append(accs[i].mibps, float64(n)/(1<<20)/d.Seconds())
			if c.pct == 1 && c.ownPct == 0 {
				// The full copy, right after, between the same two nodes.
				b.syncAll()
				ft, err := b.fullCopy(bk.url(vol), dst)
				if err != nil {
					b.logln("  nbdcopy round %d: %v", r+1, err)
					fullErrs = append(fullErrs, err.Error())
				} else {
					fullT = ft
					full = append(full, ft.Seconds())
					fullMiBps = append(fullMiBps, float64(resyncVolSize)/(1<<20)/ft.Seconds())
					b.logln("  nbdcopy of the whole %d GiB volume round %d: %.2f s", resyncVolSize>>30, r+1, ft.Seconds())
				}
			}
			a.remove(vol)
			bk.remove(vol)
		}
		// Ratios to this round's full copy.
		if fullT > 0 {
			for i := range cfgs {
				if n := len(accs[i].secs); n > len(accs[i].vs) {
					accs[i].vs = append(accs[i].vs, accs[i].secs[n-1]/fullT.Seconds())
				}
			}
		}
	}
	regions := float64(resyncVolSize / regionSize)
	for i, c := range cfgs {
		b.res.Resync = append(b.res.Resync, resyncRow{Label: c.label, Pct: c.pct, OwnPct: c.ownPct,
			Written: int64(regions*(c.pct+c.ownPct)/100) * regionSize, VolumeSize: resyncVolSize,
			Seconds: summarize(accs[i].secs), Bytes: summarize(accs[i].bytes), VsFull: summarize(accs[i].vs),
			MiBps: summarize(accs[i].mibps), Errors: errs[i]})
	}
	b.res.FullCopy = resyncRow{Label: "full nbdcopy of the volume", VolumeSize: resyncVolSize, Written: resyncVolSize,
		Seconds: summarize(full), Bytes: summarize(repeat(float64(resyncVolSize), len(full))), MiBps: summarize(fullMiBps),
		VsFull: summarize(repeat(1, len(full))), Errors: fullErrs}
	return nil
}

func repeat(v float64, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}

type scaleRow struct {
	SizeGiB       int
	IOPS          stat
	ResyncSeconds stat
	ResyncBytes   stat
	Errors        []string
}

// runScaling: Async pairs of 1, 4 and 16 GiB (sparse files). IOPS of 4 KiB
// random writes at QD32, and the resync of the same 64 MiB diff (1024
// regions) written while the primary was detached from its backup.
func (b *bench) runScaling() error {
	a, bk := b.newAgent("sc-a"), b.newAgent("sc-b")
	if err := a.start(); err != nil {
		return err
	}
	if err := bk.start(); err != nil {
		return err
	}
	sizes := []int{1, 4, 16}
	for _, g := range sizes {
		vol := fmt.Sprintf("scale-%dg", g)
		if err := pair(a, bk, vol, int64(g)<<30, agentapi.ModeAsync, 1); err != nil {
			return err
		}
		if err := testkit.Wait(30*time.Second, vol+" in sync", inSync(a, bk, vol)); err != nil {
			return err
		}
	}
	const diffRegions = 1024
	type acc struct {
		iops, secs, bytes []float64
		errs              []string
	}
	accs := make([]acc, len(sizes))
	w := workloads[0]
	rt := min(b.runtime, 2*time.Second) // a trend, not the fio table
	for r := 0; r < b.runs; r++ {
		for k := range sizes {
			i := (k + r) % len(sizes)
			g := sizes[i]
			vol := fmt.Sprintf("scale-%dg", g)
			size := int64(g) << 30
			b.syncAll()
			res, err := fio(a.url(vol), size, w, rt)
			if err != nil {
				accs[i].errs = append(accs[i].errs, err.Error())
			} else {
				accs[i].iops = append(accs[i].iops, res.IOPS)
			}
			// Detach, write the diff alone, re-attach and time the COPY.
			if err := testkit.Wait(60*time.Second, vol+" in sync", inSync(a, bk, vol)); err != nil {
				accs[i].errs = append(accs[i].errs, err.Error())
				continue
			}
			if err := a.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync, PeerNode: bk.node}); err != nil {
				return err
			}
			if err := writeRegions(a.url(vol), size, diffRegions); err != nil {
				accs[i].errs = append(accs[i].errs, err.Error())
			}
			st, err := a.status(vol)
			if err != nil {
				return err
			}
			before := st.Copy.CopiedBytesTotal
			t0 := time.Now()
			if err := a.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Mode: agentapi.ModeAsync, PeerNode: bk.node, PeerAddress: bk.repl}); err != nil {
				return err
			}
			if err := testkit.Wait(5*time.Minute, vol+" resync", inSync(a, bk, vol)); err != nil {
				accs[i].errs = append(accs[i].errs, err.Error())
				continue
			}
			d := time.Since(t0)
			st, _ = a.status(vol)
			accs[i].secs = append(accs[i].secs, d.Seconds())
			accs[i].bytes = append(accs[i].bytes, float64(st.Copy.CopiedBytesTotal-before))
			b.logln("  %2d GiB round %d: %8.0f IOPS, resync of %d regions %.3f s (%.1f MiB)", g, r+1, res.IOPS, diffRegions, d.Seconds(), float64(st.Copy.CopiedBytesTotal-before)/(1<<20))
		}
	}
	for i, g := range sizes {
		b.res.Scaling = append(b.res.Scaling, scaleRow{SizeGiB: g, IOPS: summarize(accs[i].iops),
			ResyncSeconds: summarize(accs[i].secs), ResyncBytes: summarize(accs[i].bytes), Errors: accs[i].errs})
	}
	return nil
}
