package image

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// ContainerConfig is the part of an OCI/Docker image config that says how a
// container of the image runs.
type ContainerConfig struct {
	Env          []string            `json:"Env,omitempty"`
	Entrypoint   []string            `json:"Entrypoint,omitempty"`
	Cmd          []string            `json:"Cmd,omitempty"`
	WorkingDir   string              `json:"WorkingDir,omitempty"`
	ExposedPorts map[string]struct{} `json:"ExposedPorts,omitempty"`
}

// DefaultPath is the PATH of the images this package writes.
const DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// WriteDockerArchive writes a one-layer image whose root filesystem is dir
// as a `docker save` archive (what `docker load`, `docker import`-free
// preloading and `skopeo copy docker-archive:` read), tagged repoTag. The
// layer is reproducible: entries sorted, owner root, mtime 0. Hard links
// are stored as copies.
func WriteDockerArchive(out, dir, repoTag string, cc ContainerConfig) error {
	tmp, err := os.MkdirTemp(filepath.Dir(out), ".archive-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	layer := filepath.Join(tmp, "layer.tar")
	diffID, err := writeLayer(layer, dir)
	if err != nil {
		return fmt.Errorf("layer of %s: %w", dir, err)
	}
	if len(cc.Env) == 0 {
		cc.Env = []string{DefaultPath}
	}
	cfg := map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      time.Unix(0, 0).UTC().Format(time.RFC3339),
		"config":       cc,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + diffID}},
		"history":      []map[string]string{{"created": time.Unix(0, 0).UTC().Format(time.RFC3339), "created_by": "firerunner image (WriteDockerArchive)"}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgID := sha256Hex(cfgJSON)
	manifest, _ := json.Marshal([]map[string]any{{
		"Config":   cfgID + ".json",
		"RepoTags": []string{repoTag},
		"Layers":   []string{diffID + "/layer.tar"},
	}})
	f, err := os.Create(out + ".tmp")
	if err != nil {
		return err
	}
	defer os.Remove(out + ".tmp")
	tw := tar.NewWriter(f)
	add := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: diffID + "/", Mode: 0o755, ModTime: time.Unix(0, 0), Typeflag: tar.TypeDir}); err != nil {
		return err
	}
	lf, err := os.Open(layer)
	if err != nil {
		return err
	}
	st, _ := lf.Stat()
	if err := tw.WriteHeader(&tar.Header{Name: diffID + "/layer.tar", Mode: 0o644, Size: st.Size(), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
		lf.Close()
		return err
	}
	_, err = io.Copy(tw, lf)
	lf.Close()
	if err != nil {
		return err
	}
	if err := add(cfgID+".json", cfgJSON); err != nil {
		return err
	}
	if err := add("manifest.json", manifest); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(out+".tmp", out)
}

// writeLayer tars dir (its contents at the archive root) and returns the
// tar's sha256 (the layer's diff id).
func writeLayer(out, dir string) (string, error) {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	sort.Strings(paths)
	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(f, h))
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			return "", err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		hdr := &tar.Header{Name: rel, Mode: int64(fi.Mode().Perm()), ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		if fi.Mode()&fs.ModeSticky != 0 {
			hdr.Mode |= 0o1000
		}
		if fi.Mode()&fs.ModeSetuid != 0 {
			hdr.Mode |= 0o4000
		}
		switch {
		case fi.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return "", err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, t
		case fi.Mode().IsRegular():
			hdr.Typeflag, hdr.Size = tar.TypeReg, fi.Size()
		default:
			continue // no devices or sockets in these images
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return "", err
		}
		if hdr.Typeflag == tar.TypeReg {
			src, err := os.Open(p)
			if err != nil {
				return "", err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				return "", err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), f.Close()
}

// ArchiveRepoTag returns the first RepoTag of a `docker save` archive.
func ArchiveRepoTag(archive string) (string, error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return "", fmt.Errorf("%s: no manifest.json (not a docker save archive)", archive)
		}
		if err != nil {
			return "", fmt.Errorf("%s: %w", archive, err)
		}
		if strings.TrimPrefix(h.Name, "./") != "manifest.json" {
			continue
		}
		var m []struct{ RepoTags []string }
		if err := json.NewDecoder(io.LimitReader(tr, 1<<20)).Decode(&m); err != nil {
			return "", fmt.Errorf("%s: manifest.json: %w", archive, err)
		}
		if len(m) == 0 || len(m[0].RepoTags) == 0 {
			return "", fmt.Errorf("%s: the image has no tag (docker save NAME:TAG)", archive)
		}
		return m[0].RepoTags[0], nil
	}
}
