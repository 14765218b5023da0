package ociarchive

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// writeSource writes a local file with the given content and mode.
func writeSource(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask
		t.Fatal(err)
	}
	return p
}

// layerEntry is what the tests check of a layer's tar entry.
type layerEntry struct {
	Name    string
	Type    byte
	Mode    int64
	Content string
}

// readLayer lists a layer's entries and checks the fields that must be
// fixed (owner, dates).
func readLayer(t *testing.T, r io.Reader) []layerEntry {
	t.Helper()
	var out []layerEntry
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || hdr.Uname != "" || hdr.Gname != "" {
			t.Errorf("%s: owner %d:%d (%q:%q), want 0:0", hdr.Name, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname)
		}
		if !hdr.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("%s: mtime %v, want the epoch", hdr.Name, hdr.ModTime)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, layerEntry{hdr.Name, hdr.Typeflag, hdr.Mode, string(data)})
	}
}

func TestLayerTar(t *testing.T) {
	dir := t.TempDir()
	exe := writeSource(t, dir, "exe", "#!binary", 0o700)
	data := writeSource(t, dir, "data", "text", 0o600)
	other := writeSource(t, dir, "other", "x", 0o775)

	tests := []struct {
		name    string
		files   []File
		want    []layerEntry
		wantErr string
	}{{
		name:  "parents are directories, entries sorted, modes normalized",
		files: []File{{"/usr/local/bin/manager", exe}, {"/etc/tandem/conf", data}, {"/usr/local/bin/agent", other}},
		want: []layerEntry{
			{"etc/", tar.TypeDir, 0o755, ""},
			{"etc/tandem/", tar.TypeDir, 0o755, ""},
			{"etc/tandem/conf", tar.TypeReg, 0o644, "text"},
			{"usr/", tar.TypeDir, 0o755, ""},
			{"usr/local/", tar.TypeDir, 0o755, ""},
			{"usr/local/bin/", tar.TypeDir, 0o755, ""},
			{"usr/local/bin/agent", tar.TypeReg, 0o755, "x"},
			{"usr/local/bin/manager", tar.TypeReg, 0o755, "#!binary"},
		},
	}, {
		name:  "a file at the root",
		files: []File{{"/pause", exe}},
		want:  []layerEntry{{"pause", tar.TypeReg, 0o755, "#!binary"}},
	}, {
		name:    "relative path",
		files:   []File{{"usr/bin/x", exe}},
		wantErr: "clean absolute",
	}, {
		name:    "unclean path",
		files:   []File{{"/usr//bin/x", exe}},
		wantErr: "clean absolute",
	}, {
		name:    "root",
		files:   []File{{"/", exe}},
		wantErr: "clean absolute",
	}, {
		name:    "twice",
		files:   []File{{"/x", exe}, {"/x", data}},
		wantErr: "given twice",
	}, {
		name:    "file and directory",
		files:   []File{{"/x", exe}, {"/x/y", data}},
		wantErr: "both a file and a directory",
	}, {
		name:    "directory and file",
		files:   []File{{"/x/y", exe}, {"/x", data}},
		wantErr: "both a file and a directory",
	}, {
		name:    "missing source",
		files:   []File{{"/x", filepath.Join(dir, "nope")}},
		wantErr: "no such file",
	}, {
		name:    "source is a directory",
		files:   []File{{"/x", dir}},
		wantErr: "not a regular file",
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := LayerTar(tc.files)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := readLayer(t, bytes.NewReader(b)); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("layer:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseReference(t *testing.T) {
	tests := []struct {
		in, name, tag string
	}{
		{"ghcr.io/tandem-storage/tandem:dev", "ghcr.io/tandem-storage/tandem:dev", "dev"},
		{"tandem.local/pause:1", "tandem.local/pause:1", "1"},
		{"localhost:5000/tandem:v0.1.0", "localhost:5000/tandem:v0.1.0", "v0.1.0"},
		{"tandem:dev", "docker.io/library/tandem:dev", "dev"},
		{"example/tandem", "docker.io/example/tandem:latest", "latest"},
	}
	for _, tc := range tests {
		ref, err := ParseReference(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if ref.Name != tc.name || ref.Tag != tc.tag {
			t.Errorf("%s: got %+v, want name %s tag %s", tc.in, ref, tc.name, tc.tag)
		}
	}
	for _, bad := range []string{"", "Upper/Case:x", "ghcr.io/x@sha256:" + strings.Repeat("0", 64), "x:bad tag"} {
		if _, err := ParseReference(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// testSpec is an image like Tandem's, with small stand-in binaries.
func testSpec(t *testing.T) Spec {
	dir := t.TempDir()
	return Spec{
		Files: []File{
			{"/usr/local/bin/manager", writeSource(t, dir, "manager", "manager binary", 0o755)},
			{"/usr/local/bin/agent", writeSource(t, dir, "agent", "agent binary", 0o755)},
		},
		User:       "65532:65532",
		Entrypoint: []string{"/usr/local/bin/manager"},
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
		Labels:     map[string]string{"org.opencontainers.image.licenses": "Apache-2.0", "k": "a value"},
		OS:         "linux",
		Arch:       "arm64",
		CreatedBy:  "test",
	}
}

func TestWriteFileReadBack(t *testing.T) {
	spec := testSpec(t)
	ref, err := ParseReference("ghcr.io/tandem-storage/tandem:dev")
	if err != nil {
		t.Fatal(err)
	}
	img, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "sub", "tandem.tar")
	res, err := WriteFile(out, ref, img)
	if err != nil {
		t.Fatal(err)
	}

	// The docker-save side, as `docker load` reads it, found by its tag.
	tag, err := name.NewTag(ref.Name)
	if err != nil {
		t.Fatal(err)
	}
	back, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := back.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "arm64" {
		t.Errorf("platform %s/%s, want linux/arm64", cf.OS, cf.Architecture)
	}
	if !cf.Created.Equal(time.Unix(0, 0)) {
		t.Errorf("created %v, want the epoch", cf.Created)
	}
	if cf.Config.User != spec.User || !reflect.DeepEqual(cf.Config.Entrypoint, spec.Entrypoint) ||
		!reflect.DeepEqual(cf.Config.Env, spec.Env) || !reflect.DeepEqual(cf.Config.Labels, spec.Labels) || cf.Config.Cmd != nil {
		t.Errorf("config %+v, want user, entrypoint, env and labels of %+v", cf.Config, spec)
	}
	if got, err := back.ConfigName(); err != nil || got != res.ConfigDigest {
		t.Errorf("config digest %v (%v), want %v", got, err, res.ConfigDigest)
	}
	layers, err := back.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %v (%v), want one", layers, err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	wantFiles := []layerEntry{
		{"usr/", tar.TypeDir, 0o755, ""},
		{"usr/local/", tar.TypeDir, 0o755, ""},
		{"usr/local/bin/", tar.TypeDir, 0o755, ""},
		{"usr/local/bin/agent", tar.TypeReg, 0o755, "agent binary"},
		{"usr/local/bin/manager", tar.TypeReg, 0o755, "manager binary"},
	}
	if got := readLayer(t, rc); !reflect.DeepEqual(got, wantFiles) {
		t.Errorf("layer:\n got %+v\nwant %+v", got, wantFiles)
	}

	// The OCI layout side, as containerd reads it: the index names the
	// image and points at the manifest with the digest Write returned.
	layoutDir := t.TempDir()
	untar(t, out, layoutDir)
	idx, err := layout.ImageIndexFromPath(layoutDir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(im.Manifests))
	}
	d := im.Manifests[0]
	wantAnn := map[string]string{AnnotationImageName: "ghcr.io/tandem-storage/tandem:dev", AnnotationRefName: "dev"}
	if d.Digest != res.Digest || d.MediaType != types.OCIManifestSchema1 || !reflect.DeepEqual(d.Annotations, wantAnn) ||
		d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != "arm64" {
		t.Errorf("index entry %+v, want digest %v, OCI manifest, annotations %v, linux/arm64", d, res.Digest, wantAnn)
	}
	oimg, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	m, err := oimg.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.Digest != res.ConfigDigest || m.Config.MediaType != types.OCIConfigJSON ||
		len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("manifest %+v, want OCI media types and config %v", m, res.ConfigDigest)
	}
	if err := validateBlobs(layoutDir); err != nil {
		t.Error(err)
	}

	// The archive itself: no owners, no dates.
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var names []string
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || !hdr.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("archive entry %s: owner %d:%d, mtime %v", hdr.Name, hdr.Uid, hdr.Gid, hdr.ModTime)
		}
		if hdr.Name == "manifest.json" {
			var dm []struct{ RepoTags []string }
			if err := json.NewDecoder(tr).Decode(&dm); err != nil {
				t.Fatal(err)
			}
			if len(dm) != 1 || !reflect.DeepEqual(dm[0].RepoTags, []string{"ghcr.io/tandem-storage/tandem:dev"}) {
				t.Errorf("manifest.json %+v, want one image tagged ghcr.io/tandem-storage/tandem:dev", dm)
			}
		}
		names = append(names, hdr.Name)
	}
	for _, want := range []string{"oci-layout", "index.json", "manifest.json", "blobs/sha256/" + res.Digest.Hex} {
		if !contains(names, want) {
			t.Errorf("archive has no %s (%v)", want, names)
		}
	}
	if matches, _ := filepath.Glob(filepath.Join(filepath.Dir(out), "*.tmp*")); len(matches) > 0 {
		t.Errorf("temporary files left: %v", matches)
	}
}

// validateBlobs checks that every blob of an OCI layout is named by its
// content's digest.
func validateBlobs(dir string) error {
	entries, err := os.ReadDir(filepath.Join(dir, "blobs", "sha256"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", e.Name()))
		if err != nil {
			return err
		}
		if got := fmt.Sprintf("%x", sha256.Sum256(data)); got != e.Name() {
			return fmt.Errorf("blob %s has digest %s", e.Name(), got)
		}
	}
	return nil
}

func TestDeterministic(t *testing.T) {
	spec := testSpec(t)
	ref, err := ParseReference("ghcr.io/tandem-storage/tandem:dev")
	if err != nil {
		t.Fatal(err)
	}
	build := func(files []File) (Result, [32]byte) {
		t.Helper()
		s := spec
		s.Files = files
		img, err := Build(s)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		res, err := Write(&buf, ref, img)
		if err != nil {
			t.Fatal(err)
		}
		return res, sha256.Sum256(buf.Bytes())
	}
	res1, sum1 := build(spec.Files)

	// Same content with other dates, another order and another umask.
	dir := t.TempDir()
	var copies []File
	for i := len(spec.Files) - 1; i >= 0; i-- {
		f := spec.Files[i]
		data, err := os.ReadFile(f.Source)
		if err != nil {
			t.Fatal(err)
		}
		p := writeSource(t, dir, filepath.Base(f.Source), string(data), 0o700)
		if err := os.Chtimes(p, time.Now().Add(time.Hour), time.Now().Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		copies = append(copies, File{f.Path, p})
	}
	res2, sum2 := build(copies)
	if res1 != res2 || sum1 != sum2 {
		t.Errorf("two builds of the same files differ: %v %x, %v %x", res1, sum1, res2, sum2)
	}

	// A changed byte changes the digest.
	changed := []File{spec.Files[0], {spec.Files[1].Path, writeSource(t, dir, "changed", "agent binarY", 0o755)}}
	if res3, _ := build(changed); res3.Digest == res1.Digest {
		t.Errorf("a changed file kept the digest %v", res1.Digest)
	}
	// So does a changed label.
	spec.Labels = map[string]string{"k": "other"}
	if res4, _ := build(spec.Files); res4.Digest == res1.Digest || res4.ConfigDigest == res1.ConfigDigest {
		t.Errorf("a changed label kept the digest %v", res1.Digest)
	}
}

func TestBuildNeedsPlatform(t *testing.T) {
	spec := testSpec(t)
	spec.Arch = ""
	if _, err := Build(spec); err == nil {
		t.Error("no error without an architecture")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// untar extracts the archive's regular files and directories into dir.
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(hdr.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Fatalf("archive entry %q escapes", hdr.Name)
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %q has type %c", hdr.Name, hdr.Typeflag)
		}
	}
}
