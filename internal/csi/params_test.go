package csi

import (
	"strings"
	"testing"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func TestParseParams(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      map[string]string
		wantErr string // substring; "" for success
		check   func(t *testing.T, p volumeParams)
	}{
		{name: "defaults", in: nil, check: func(t *testing.T, p volumeParams) {
			if p.spec.Mode != v1.ModeSync || p.regionSize != v1.DefaultRegionSize || !p.podFailover || p.spec.RegionSize != nil {
				t.Errorf("defaults: %+v", p)
			}
		}},
		{name: "everything", in: map[string]string{
			"mode": "Async", "regionSize": "1Mi", "failoverPolicy": "Manual", "failbackPolicy": "Automatic",
			"leaseDurationSeconds": "10", "probePeriodSeconds": "3", "failureThreshold": "5",
			"resyncMaxBytesPerSecond": "100Mi", "mergePrimaryBitmap": "false", "podFailover": "false",
			"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "app", "csi.storage.k8s.io/pv/name": "pvc-1",
			"csi.storage.k8s.io/fstype": "xfs",
		}, check: func(t *testing.T, p volumeParams) {
			s := p.spec
			if s.Mode != v1.ModeAsync || p.regionSize != 1<<20 || s.Failover.Policy != v1.PolicyManual || s.Failback.Policy != v1.PolicyAutomatic ||
				s.Failover.LeaseDurationSeconds != 10 || s.Failover.ProbePeriodSeconds != 3 || s.Failover.FailureThreshold != 5 ||
				s.Resync.MaxBytesPerSecond != 100<<20 || s.Resync.MergePrimaryBitmap == nil || *s.Resync.MergePrimaryBitmap || p.podFailover ||
				p.pvcName != "data" || p.pvcNS != "app" || p.pvName != "pvc-1" {
				t.Errorf("parsed: %+v", p)
			}
		}},
		{name: "lower-case mode", in: map[string]string{"mode": "sync"}, wantErr: `parameter mode="sync": want Sync or Async (capitalised)`},
		{name: "typo", in: map[string]string{"modes": "Sync"}, wantErr: `unknown parameter "modes" (known: mode, regionSize`},
		{name: "region not a power of two", in: map[string]string{"regionSize": "3Ki"}, wantErr: "parameter regionSize=\"3Ki\": want a power of two from 4Ki to 64Mi"},
		{name: "region too large", in: map[string]string{"regionSize": "128Mi"}, wantErr: "regionSize"},
		{name: "region smallest", in: map[string]string{"regionSize": "4Ki"}},
		{name: "region largest", in: map[string]string{"regionSize": "64Mi"}},
		{name: "region spelled as a fraction", in: map[string]string{"regionSize": "0.5Mi"}, check: func(t *testing.T, p volumeParams) {
			if p.regionSize != 512<<10 {
				t.Errorf("regionSize = %d, want 512Ki", p.regionSize)
			}
		}},
		{name: "region not a whole number", in: map[string]string{"regionSize": "4096.5"}, wantErr: "want a power of two from 4Ki to 64Mi"},
		{name: "rate the quantity parser keeps as a decimal", in: map[string]string{"resyncMaxBytesPerSecond": "100Ti"}, check: func(t *testing.T, p volumeParams) {
			if p.spec.Resync.MaxBytesPerSecond != 100<<40 {
				t.Errorf("maxBytesPerSecond = %d, want 100Ti", p.spec.Resync.MaxBytesPerSecond)
			}
		}},
		{name: "rate beyond int64", in: map[string]string{"resyncMaxBytesPerSecond": "1e30"}, wantErr: "want a byte rate"},
		{name: "lease out of range", in: map[string]string{"leaseDurationSeconds": "301"}, wantErr: "want a whole number from 2 to 300"},
		{name: "lease not above probe", in: map[string]string{"leaseDurationSeconds": "4", "probePeriodSeconds": "4"}, wantErr: "leaseDurationSeconds (4) must be greater than probePeriodSeconds (4)"},
		{name: "lease default not above probe", in: map[string]string{"probePeriodSeconds": "6"}, wantErr: "leaseDurationSeconds (6) must be greater than probePeriodSeconds (6)"},
		{name: "bad policy", in: map[string]string{"failoverPolicy": "auto"}, wantErr: "want Automatic or Manual"},
		{name: "bad bool", in: map[string]string{"podFailover": "yes"}, wantErr: "want true or false"},
		{name: "negative rate", in: map[string]string{"resyncMaxBytesPerSecond": "-1"}, wantErr: "want a byte rate"},
		{name: "all errors at once", in: map[string]string{"mode": "x", "zzz": "1"}, wantErr: `parameter mode="x": want Sync or Async (capitalised); unknown parameter "zzz"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parseParams(tc.in)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			if tc.check != nil {
				tc.check(t, p)
			}
		})
	}
}

func TestVolumePairName(t *testing.T) {
	if got := VolumePairName("pvc-0f1e2d3c-aaaa-bbbb-cccc-1234567890ab"); got != "pvc-0f1e2d3c-aaaa-bbbb-cccc-1234567890ab" {
		t.Errorf("a provisioner name changed: %s", got)
	}
	a, b := VolumePairName("Sanity-1"), VolumePairName("sanity-1")
	if a == b || !strings.HasPrefix(a, "tv-") || len(a) > 63 {
		t.Errorf("Sanity-1 → %s, sanity-1 → %s", a, b)
	}
	if VolumePairName(strings.Repeat("a", 64)) == strings.Repeat("a", 64) {
		t.Error("a 64-character name was kept")
	}
}

func TestVolumeKey(t *testing.T) {
	for _, tc := range []struct{ id, ns, name string }{
		{"pvc-1", "tandem-system", "pvc-1"},
		{"app/db", "app", "db"},
		{"Bad Name", "", ""},
		{"a/b/c", "", ""},
	} {
		k, err := VolumeKey(tc.id, "tandem-system")
		if tc.ns == "" {
			if err == nil {
				t.Errorf("%q: got %v, want an error", tc.id, k)
			}
			continue
		}
		if err != nil || k.Namespace != tc.ns || k.Name != tc.name {
			t.Errorf("%q: %v %v", tc.id, k, err)
		}
	}
}
