package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

func TestChecksumsAPI(t *testing.T) {
	a, srv := newTestAgent(t)
	c := NewClient(srv.URL, "s3cret")
	ctx := context.Background()
	const size, rs = 8 << 20, 64 << 10 // 128 regions
	if _, err := c.Put(ctx, "ns", "vol", VolumeRequest{Size: size, RegionSize: rs, Spec: volume.Spec{Role: volume.RolePrimary, Epoch: 1, Initialize: true, Mode: volume.ModeAsync}}); err != nil {
		t.Fatal(err)
	}
	data := []byte(strings.Repeat("tandem", 1000))
	if err := a.get("ns/vol").WriteAt(ctx, data, 9*rs+10, false); err != nil {
		t.Fatal(err)
	}
	region9 := make([]byte, rs)
	copy(region9[10:], data)
	zero := hex.EncodeToString(func() []byte { s := sha256.Sum256(make([]byte, rs)); return s[:] }())
	nine := hex.EncodeToString(func() []byte { s := sha256.Sum256(region9); return s[:] }())

	got, err := c.Checksums(ctx, "ns", "vol", 8, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got.RegionSize != rs || got.First != 8 || got.Algorithm != "sha256" {
		t.Fatalf("answer header: %+v", got)
	}
	if want := []string{zero, nine, zero}; strings.Join(got.Sums, ",") != strings.Join(want, ",") {
		t.Fatalf("sums = %v, want %v", got.Sums, want)
	}

	// Defaults: from region 0, as many as one call allows, cut at the end.
	var all Checksums
	if err := rawCall(ctx, c, http.MethodGet, "/v1/volumes/ns/vol/checksums", nil, &all); err != nil {
		t.Fatal(err)
	}
	if all.First != 0 || len(all.Sums) != size/rs || all.Sums[9] != nine {
		t.Fatalf("default window: first %d, %d sums, sum[9] %s", all.First, len(all.Sums), all.Sums[9])
	}
	if err := rawCall(ctx, c, http.MethodGet, "/v1/volumes/ns/vol/checksums?first=120", nil, &all); err != nil || len(all.Sums) != 8 {
		t.Fatalf("default count from region 120: %d sums, err %v; want 8", len(all.Sums), err)
	}

	var apiErr *APIError
	for _, tc := range []struct {
		path string
		code int
		msg  string
	}{
		{"/v1/volumes/ns/vol/checksums?first=-1", 400, "query parameter first"},
		{"/v1/volumes/ns/vol/checksums?count=x", 400, "query parameter count"},
		{"/v1/volumes/ns/vol/checksums?first=120&count=9", 400, "outside the volume"},
		{"/v1/volumes/ns/vol/checksums?first=129", 400, "outside the volume"},
		{"/v1/volumes/ns/vol/checksums?count=4097", 400, "at most 4096"},
		{"/v1/volumes/ns/missing/checksums", 404, "no volume ns/missing"},
	} {
		err := rawCall(ctx, c, http.MethodGet, tc.path, nil, nil)
		if !errors.As(err, &apiErr) || apiErr.Code != tc.code || !strings.Contains(apiErr.Message, tc.msg) {
			t.Errorf("GET %s: err = %v, want %d containing %q", tc.path, err, tc.code, tc.msg)
		}
	}
	if _, err := NewClient(srv.URL, "wrong").Checksums(ctx, "ns", "vol", 0, 1); !errors.As(err, &apiErr) || apiErr.Code != 401 {
		t.Errorf("wrong token: err = %v, want 401", err)
	}
}
