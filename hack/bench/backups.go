package main

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// backupsRow is one workload on a writer with 1, 2 or 3 backups.
type backupsRow struct {
	Workload string
	Mode     agentapi.Mode
	Backups  int
	IOPS     stat
	MiBs     stat
	Ratio    stat // IOPS ÷ the same mode with one backup, same round
	Errors   []string
}

// thirdResync is the resync of a third member after a failover.
type thirdResync struct {
	VolumeSize int64
	Written    stat // bytes written while the third member was away
	Copied     stat // bytes the new writer copied to it
	Seconds    stat
	Full       int // runs in which the copy was a full copy
	Errors     []string
}

// backupsWorkloads are the writes measured with several backups.
var backupsWorkloads = []workload{workloads[0], workloads[1]}

// runBackups measures write IOPS on a writer with one, two and three
// backups (Async and Sync, every backup in the same mode), the targets
// rotated round by round, then the resync of a third member after a
// failover.
func (b *bench) runBackups() error {
	ag := []*agentProc{b.newAgent("node-a"), b.newAgent("node-b"), b.newAgent("node-c"), b.newAgent("node-d")}
	for _, a := range ag {
		if err := a.start(); err != nil {
			return err
		}
	}
	type target struct {
		vol     string
		mode    agentapi.Mode
		backups int
	}
	var ts []target
	for _, m := range []agentapi.Mode{agentapi.ModeAsync, agentapi.ModeSync} {
		for n := 1; n <= 3; n++ {
			t := target{vol: fmt.Sprintf("%s-%d", strings.ToLower(string(m)), n), mode: m, backups: n}
			if err := members(ag[0], ag[1:1+n], t.vol, fioVolSize, m, 1); err != nil {
				return err
			}
			if err := testkit.Wait(60*time.Second, t.vol+" in sync", allInSync(ag[0], ag[1:1+n], t.vol)); err != nil {
				return err
			}
			ts = append(ts, t)
		}
	}
	for _, w := range backupsWorkloads {
		iops := map[string][]float64{}
		mibs := map[string][]float64{}
		ratio := map[string][]float64{}
		errs := map[string][]string{}
		for r := 0; r < b.runs; r++ {
			got := map[string]float64{}
			for i := range ts {
				t := ts[(i+r)%len(ts)]
				b.syncAll()
				res, err := fio(ag[0].url(t.vol), fioVolSize, w, b.runtime)
				if err != nil {
					b.logln("  %s %s round %d: %v", w.name, t.vol, r+1, err)
					errs[t.vol] = append(errs[t.vol], err.Error())
					continue
				}
				got[t.vol] = res.IOPS
				iops[t.vol], mibs[t.vol] = append(iops[t.vol], res.IOPS), append(mibs[t.vol], res.MiBs)
				b.logln("  %-22s %-8s round %d: %8.0f IOPS %8.1f MiB/s", w.name, t.vol, r+1, res.IOPS, res.MiBs)
			}
			for _, t := range ts {
				one := fmt.Sprintf("%s-1", strings.ToLower(string(t.mode)))
				if base, v := got[one], got[t.vol]; base > 0 && v > 0 {
					ratio[t.vol] = append(ratio[t.vol], v/base)
				}
			}
		}
		for _, t := range ts {
			b.res.Backups = append(b.res.Backups, backupsRow{Workload: w.name, Mode: t.mode, Backups: t.backups,
				IOPS: summarize(iops[t.vol]), MiBs: summarize(mibs[t.vol]), Ratio: summarize(ratio[t.vol]), Errors: errs[t.vol]})
		}
	}
	for _, t := range ts {
		for _, a := range ag {
			a.remove(t.vol)
		}
	}
	return nil
}

// runThirdResync: A writes to B and C (Async); C's agent is killed
// and 1 % of the volume's regions are written; once B holds them, A's
// agent is killed and B is promoted; C's agent restarts as B's backup. B
// copies to C what C lacks: the measure is how much, against the volume.
func (b *bench) runThirdResync() error {
	a, bk, c := b.newAgent("node-a"), b.newAgent("node-b"), b.newAgent("node-c")
	const size = resyncVolSize
	res := &b.res.ThirdResync
	*res = thirdResync{VolumeSize: size}
	var written, copied, secs []float64
	for r := 0; r < b.runs; r++ {
		vol := fmt.Sprintf("third-%d", r)
		for _, x := range []*agentProc{a, bk, c} {
			if !x.running() {
				if err := x.start(); err != nil {
					return err
				}
			}
		}
		err := func() error {
			if err := members(a, []*agentProc{bk, c}, vol, size, agentapi.ModeAsync, 1); err != nil {
				return err
			}
			if err := testkit.Wait(60*time.Second, "three in sync", allInSync(a, []*agentProc{bk, c}, vol)); err != nil {
				return err
			}
			c.kill()
			n := int64(size / regionSize / 100)
			if err := writeRegions(a.url(vol), size, n); err != nil {
				return fmt.Errorf("writes while C is away: %w", err)
			}
			if err := testkit.Wait(60*time.Second, "B holds every write", allInSync(a, []*agentProc{bk}, vol)); err != nil {
				return err
			}
			a.kill()
			if err := bk.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 2, Mode: agentapi.ModeAsync,
				PeerNode: c.node, PeerAddress: c.repl, MoreBackups: []agentapi.Peer{{Node: a.node}}}); err != nil {
				return err
			}
			st, err := bk.status(vol)
			if err != nil {
				return err
			}
			before := st.Copy.CopiedBytesTotal
			if err := c.start(); err != nil {
				return err
			}
			start := time.Now()
			if err := c.put(vol, size, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 2, Mode: agentapi.ModeAsync,
				PeerNode: bk.node, MoreBackups: []agentapi.Peer{{Node: a.node}}}); err != nil {
				return err
			}
			if err := testkit.Wait(5*time.Minute, "C in sync with B", allInSync(bk, []*agentProc{c}, vol)); err != nil {
				return err
			}
			took := time.Since(start)
			st, err = bk.status(vol)
			if err != nil {
				return err
			}
			i := slices.IndexFunc(st.Peers, func(p agentapi.PeerStatus) bool { return p.Node == c.node })
			if i >= 0 && st.Peers[i].Copy.FullCopy {
				res.Full++
			}
			written = append(written, float64(n*regionSize))
			copied = append(copied, float64(st.Copy.CopiedBytesTotal-before))
			secs = append(secs, took.Seconds())
			b.logln("  third member: %d bytes written while away, %d copied in %.2fs", n*regionSize, st.Copy.CopiedBytesTotal-before, took.Seconds())
			return nil
		}()
		if err != nil {
			b.logln("  third member round %d: %v", r+1, err)
			res.Errors = append(res.Errors, err.Error())
		}
		if err := a.start(); err == nil {
			a.remove(vol)
		}
		bk.remove(vol)
		c.remove(vol)
	}
	res.Written, res.Copied, res.Seconds = summarize(written), summarize(copied), summarize(secs)
	return nil
}

// members makes p the writer of vol with backups bs (the first as PeerNode,
// the others as MoreBackups), each backup knowing the others.
func members(p *agentProc, bs []*agentProc, vol string, size int64, mode agentapi.Mode, epoch uint64) error {
	for i, s := range bs {
		var sib []agentapi.Peer
		for j, o := range bs {
			if j != i {
				sib = append(sib, agentapi.Peer{Node: o.node})
			}
		}
		if err := s.put(vol, size, agentapi.Spec{Role: agentapi.RoleBackup, Epoch: epoch, Mode: mode, PeerNode: p.node, MoreBackups: sib}); err != nil {
			return err
		}
	}
	var more []agentapi.Peer
	for _, s := range bs[1:] {
		more = append(more, agentapi.Peer{Node: s.node, Address: s.repl, Mode: mode})
	}
	return p.put(vol, size, agentapi.Spec{Role: agentapi.RolePrimary, Epoch: epoch, Mode: mode, PeerNode: bs[0].node, PeerAddress: bs[0].repl, MoreBackups: more, Initialize: epoch == 1})
}

// allInSync reports whether the writer p streams to every backup in bs with
// nothing to copy, each UpToDate.
func allInSync(p *agentProc, bs []*agentProc, vol string) func() (bool, error) {
	return func() (bool, error) {
		ps, err := p.status(vol)
		if err != nil {
			return false, err
		}
		for _, s := range bs {
			i := slices.IndexFunc(ps.Peers, func(x agentapi.PeerStatus) bool { return x.Node == s.node })
			if i < 0 {
				return false, nil
			}
			l := ps.Peers[i]
			ss, err := s.status(vol)
			if err != nil {
				return false, err
			}
			if !l.Connected || l.OutOfSyncRegions != 0 || l.Copy.Running || ss.DataState != agentapi.UpToDate {
				return false, nil
			}
		}
		return true, nil
	}
}

// reportBackups writes the section.
func reportBackups(p func(string, ...any), r *results) {
	if len(r.Backups) == 0 && r.ThirdResync.VolumeSize == 0 {
		return
	}
	p("## More than one backup\n\n")
	p("`-only backups`. One writer and 1, 2 or 3 backups, each its own agent process on loopback, every backup in the pair's mode; fio as above on 1 GiB volumes, ")
	p("the six targets rotated round by round. *vs one backup* is the IOPS divided by the same mode's one-backup figure in the same round. ")
	p("On this machine every agent shares the same two cores and the same disk: each backup adds a process that receives, writes and fsyncs every write, ")
	p("and the writer sends one more copy of it, so the figures fall with each backup roughly as the work grows; on separate nodes a backup costs the writer only its sends.\n\n")
	cur := ""
	for _, row := range r.Backups {
		if row.Workload != cur {
			if cur != "" {
				p("\n")
			}
			cur = row.Workload
			p("### %s\n\n| mode | backups | IOPS | MiB/s | vs one backup |\n|---|---|---|---|---|\n", cur)
		}
		p("| %s | %d | %s | %s | %s |\n", row.Mode, row.Backups, row.IOPS.f(0), row.MiBs.f(1), row.Ratio.f(2))
	}
	if cur != "" {
		p("\n")
	}
	t := r.ThirdResync
	if t.VolumeSize > 0 {
		p("### Resync of the third member after a failover (%d GiB volume)\n\n", t.VolumeSize>>30)
		p("`-only thirdresync`. A writes to B and C (Async); C's agent is killed and 1 %% of the volume's regions are written (fio, 64 KiB each); ")
		p("once B holds them, A's agent is killed and B promoted; C's agent restarts as B's backup. B copies to C the OR of its bitmap of C (kept by A's watermarks) ")
		p("and C's own bitmap of B (C restarted from a crash: its bitmaps come back from its journal, whose 4 MiB extents may over-report). ")
		p("A full copy would be the whole volume.\n\n")
		p("| written while C was away | copied to C | copy time | full copies |\n|---|---|---|---|\n")
		p("| %s MiB | %s MiB | %s s | %d of %d |\n\n", mib(t.Written).f(1), mib(t.Copied).f(1), t.Seconds.f(2), t.Full, t.Copied.N)
		for _, e := range t.Errors {
			p("- error: %s\n", e)
		}
	}
}

// mib is s in MiB.
func mib(s stat) stat {
	return stat{N: s.N, Med: s.Med / (1 << 20), Min: s.Min / (1 << 20), Max: s.Max / (1 << 20)}
}
