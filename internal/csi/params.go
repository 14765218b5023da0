package csi

import (
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// StorageClass parameter keys.
const (
	ParamMode                    = "mode"
	ParamRegionSize              = "regionSize"
	ParamFailoverPolicy          = "failoverPolicy"
	ParamFailbackPolicy          = "failbackPolicy"
	ParamLeaseDurationSeconds    = "leaseDurationSeconds"
	ParamProbePeriodSeconds      = "probePeriodSeconds"
	ParamFailureThreshold        = "failureThreshold"
	ParamResyncMaxBytesPerSecond = "resyncMaxBytesPerSecond"
	ParamMergePrimaryBitmap      = "mergePrimaryBitmap"
	ParamPodFailover             = "podFailover"

	// Keys the provisioner adds (--extra-create-metadata).
	paramPVCName      = "csi.storage.k8s.io/pvc/name"
	paramPVCNamespace = "csi.storage.k8s.io/pvc/namespace"
	paramPVName       = "csi.storage.k8s.io/pv/name"
)

var knownParams = []string{ParamMode, ParamRegionSize, ParamFailoverPolicy, ParamFailbackPolicy,
	ParamLeaseDurationSeconds, ParamProbePeriodSeconds, ParamFailureThreshold,
	ParamResyncMaxBytesPerSecond, ParamMergePrimaryBitmap, ParamPodFailover}

// volumeParams is what a StorageClass's parameters ask for.
type volumeParams struct {
	spec        v1.VolumePairSpec // without size and members
	regionSize  int64
	podFailover bool
	pvcName     string
	pvcNS       string
	pvName      string
}

// parseParams checks a CreateVolume request's parameters. Errors name the
// parameter and say what it accepts.
func parseParams(p map[string]string) (volumeParams, error) {
	vp := volumeParams{regionSize: v1.DefaultRegionSize, podFailover: true}
	vp.spec.Mode = v1.ModeSync
	var errs []string
	bad := func(key, val, want string) {
		errs = append(errs, fmt.Sprintf("parameter %s=%q: %s", key, val, want))
	}
	intIn := func(key, val string, lo, hi int64) *int32 {
		n, err := strconv.ParseInt(val, 10, 32)
		if err != nil || n < lo || n > hi {
			bad(key, val, fmt.Sprintf("want a whole number from %d to %d", lo, hi))
			return nil
		}
		return ptr.To(int32(n))
	}
	policy := func(key, val string) v1.Policy {
		switch v1.Policy(val) {
		case v1.PolicyAutomatic, v1.PolicyManual:
			return v1.Policy(val)
		}
		bad(key, val, "want Automatic or Manual")
		return ""
	}
	boolean := func(key, val string) bool {
		b, err := strconv.ParseBool(val)
		if err != nil {
			bad(key, val, "want true or false")
		}
		return b
	}
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, key := range keys {
		val := p[key]
		switch key {
		case ParamMode:
			switch v1.ReplicationMode(val) {
			case v1.ModeSync, v1.ModeAsync:
				vp.spec.Mode = v1.ReplicationMode(val)
			default:
				bad(key, val, "want Sync or Async (capitalised)")
			}
		case ParamRegionSize:
			q, err := resource.ParseQuantity(val)
			n, ok := wholeBytes(q)
			if err != nil || !ok || n < v1.MinRegionSize || n > v1.MaxRegionSize || n&(n-1) != 0 {
				bad(key, val, "want a power of two from 4Ki to 64Mi")
				continue
			}
			vp.regionSize = n
			vp.spec.RegionSize = ptr.To(q)
		case ParamFailoverPolicy:
			vp.spec.Failover.Policy = policy(key, val)
		case ParamFailbackPolicy:
			vp.spec.Failback.Policy = policy(key, val)
		case ParamLeaseDurationSeconds:
			if n := intIn(key, val, 2, 300); n != nil {
				vp.spec.Failover.LeaseDurationSeconds = *n
			}
		case ParamProbePeriodSeconds:
			if n := intIn(key, val, 1, 60); n != nil {
				vp.spec.Failover.ProbePeriodSeconds = *n
			}
		case ParamFailureThreshold:
			if n := intIn(key, val, 1, 30); n != nil {
				vp.spec.Failover.FailureThreshold = *n
			}
		case ParamResyncMaxBytesPerSecond:
			q, err := resource.ParseQuantity(val)
			n, ok := wholeBytes(q)
			if err != nil || !ok || n < 0 {
				bad(key, val, "want a byte rate (a quantity such as 100Mi, 0 for unlimited)")
				continue
			}
			vp.spec.Resync.MaxBytesPerSecond = n
		case ParamMergePrimaryBitmap:
			vp.spec.Resync.MergePrimaryBitmap = ptr.To(boolean(key, val))
		case ParamPodFailover:
			vp.podFailover = boolean(key, val)
		case paramPVCName:
			vp.pvcName = val
		case paramPVCNamespace:
			vp.pvcNS = val
		case paramPVName:
			vp.pvName = val
		default:
			if strings.HasPrefix(key, "csi.storage.k8s.io/") {
				continue // the sidecars' own keys (secrets, fstype)
			}
			errs = append(errs, fmt.Sprintf("unknown parameter %q (known: %s)", key, strings.Join(knownParams, ", ")))
		}
	}
	lease, probe := vp.spec.Failover.LeaseDurationSeconds, vp.spec.Failover.ProbePeriodSeconds
	if lease == 0 {
		lease = 6
	}
	if probe == 0 {
		probe = 2
	}
	if lease <= probe {
		errs = append(errs, fmt.Sprintf("parameter %s (%d) must be greater than %s (%d)", ParamLeaseDurationSeconds, lease, ParamProbePeriodSeconds, probe))
	}
	if len(errs) > 0 {
		return volumeParams{}, fmt.Errorf("StorageClass parameters: %s", strings.Join(errs, "; "))
	}
	return vp, nil
}

// CheckParameters checks StorageClass parameters as CreateVolume does.
func CheckParameters(p map[string]string) error {
	_, err := parseParams(p)
	return err
}

// wholeBytes is q as an int64 when q is a whole number in its range.
// Quantity.AsInt64 is not enough: the parser keeps some whole numbers as
// decimals (0.5Mi, 100Ti), for which it reports false.
func wholeBytes(q resource.Quantity) (int64, bool) {
	if n, ok := q.AsInt64(); ok {
		return n, true
	}
	d := q.AsDec() // unscaled × 10^-scale
	u, scale := new(big.Int).Set(d.UnscaledBig()), int64(d.Scale())
	pow := new(big.Int).Exp(big.NewInt(10), big.NewInt(max(scale, -scale)), nil)
	if scale > 0 {
		var rem big.Int
		if u.QuoRem(u, pow, &rem); rem.Sign() != 0 {
			return 0, false
		}
	} else {
		u.Mul(u, pow)
	}
	if !u.IsInt64() {
		return 0, false
	}
	return u.Int64(), true
}
