"""A procedural, face-like morphable model that needs no download.

:func:`synthetic_face_model` builds a :class:`~jaxrender.morphable.MorphableModel`
entirely from code: a head (ellipsoid skull, flattened face, neck) deformed by
smooth bumps and dents (brow ridge, eye sockets, nose, cheeks, lips, chin,
ears), two separate eyeball meshes behind almond-shaped lid openings, a
population of randomly varied heads turned into a PCA identity basis,
hand-made expression blendshapes, a PCA albedo model (skin tones, lips, brows,
hair, irises) and the 68 iBUG landmarks. It is meant for tests, examples and
benchmarks: it reads as a face, but it is not a statistical model of real
people.

Frame and units (the Basel Face Model convention): millimetres; x points to the
subject's left (the viewer's right), y up, z out of the face towards the
viewer; the head's centre is near the origin and the nose tip near
``z = +125``. Render it with a camera on the +z axis looking towards -z.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["synthetic_face_model", "EXPRESSION_NAMES", "IBUG68_NAMES"]

EXPRESSION_NAMES = (
    "jaw_open",
    "smile",
    "brow_raise",
    "brow_frown",
    "blink_left",
    "blink_right",
    "pucker",
    "cheek_puff",
    "mouth_left",
    "mouth_right",
)

IBUG68_NAMES = tuple(
    [f"jaw_{i:02d}" for i in range(17)]
    + [f"right_brow_{i}" for i in range(5)]
    + [f"left_brow_{i}" for i in range(5)]
    + [f"nose_bridge_{i}" for i in range(4)]
    + [f"nose_base_{i}" for i in range(5)]
    + [f"right_eye_{i}" for i in range(6)]
    + [f"left_eye_{i}" for i in range(6)]
    + [f"outer_lip_{i:02d}" for i in range(12)]
    + [f"inner_lip_{i}" for i in range(8)]
)

# ----------------------------------------------------------------------------
# Shape parameters of one head. The population varies these around DEFAULTS.

DEFAULTS = dict(
    head_w=76.0,  # half width of the skull (x)
    head_h=112.0,  # half height of the skull (y)
    head_d=98.0,  # half depth (z)
    head_cy=22.0,  # y of the skull centre
    face_flat=2.6,  # superellipse exponent of the front half (flatter face)
    jaw_w=0.80,  # jaw width relative to the skull at the chin level
    chin_y=-92.0,  # y of the chin tip
    chin_fwd=6.0,  # chin protrusion
    eye_x=32.0,  # half distance between the eye centres
    eye_y=28.0,  # eye height
    eye_depth=9.0,  # socket depth
    brow_y=45.0,
    brow_h=5.0,
    nose_len=48.0,  # nasion to tip
    nose_proj=26.0,  # tip protrusion
    nose_w=15.0,  # half width of the nostrils
    mouth_y=-50.0,
    mouth_w=25.0,  # half width of the mouth
    lip_full=5.5,
    cheek=6.0,
    ear=12.0,
    forehead=4.0,
)

_VARIATION = dict(  # standard deviation of each parameter in the population
    head_w=5.0, head_h=5.0, head_d=5.0, head_cy=2.0, face_flat=0.25, jaw_w=0.05,
    chin_y=4.0, chin_fwd=3.0, eye_x=2.0, eye_y=2.5, eye_depth=1.5, brow_y=2.5,
    brow_h=1.5, nose_len=4.0, nose_proj=3.5, nose_w=2.0, mouth_y=3.0,
    mouth_w=2.5, lip_full=1.2, cheek=2.0, ear=3.0, forehead=2.0,
)

EYE_RADIUS = 12.0
EYE_SINK = 2.5  # depth of the cornea's front behind the closed-lid skin surface
LID_PUSH = 9.0  # how far the skin inside the lid opening is pushed back
EYE_UV_BOX = (0.0, 0.0, 0.08, 0.08)  # both eyeballs share this corner of the texture (back of the neck)
IRIS_COS = math.cos(math.radians(30.0))  # angular radius of the iris on the eyeball
PUPIL_COS = math.cos(math.radians(13.0))


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _warp(s, density):
    """Map [-1, 1] -> [-1, 1] with ``density`` times more samples near 0."""
    b = 1.0 / density
    return s * (b + (1 - b) * s * s)


def _grid(resolution):
    n_lat = int(resolution)
    n_lon = 2 * int(resolution)
    # polar parameter t in (0, 1): 0 at the crown, 1 at the neck's base;
    # denser around the face (t ~ 0.45), and longitude denser at the front.
    s_lat = np.linspace(-1.0, 1.0, n_lat + 2)[1:-1]
    t = 0.47 + 0.53 * _warp(s_lat, 1.9)
    s_lon = (np.arange(n_lon) + 0.5) / n_lon * 2 - 1
    phi = np.pi * _warp(s_lon, 2.2)  # 0 = front (+z), +-pi = back
    return t, phi


def _grid_faces(n_lat, n_lon, uv=False):
    """Triangles of a closed lat-long grid with a pole vertex at each end.

    Vertex ``1 + i * n_lon + j`` is ring ``i``, longitude ``j``; vertex 0 is the
    first pole, the last one the other pole. With ``uv=True`` the same
    triangles index a UV grid with a duplicated seam column (``n_lon + 1``
    columns), so texture coordinates do not wrap.
    """
    cols = n_lon + 1 if uv else n_lon
    idx = 1 + np.arange(n_lat * cols).reshape(n_lat, cols)
    j = np.arange(n_lon)
    jn = j + 1 if uv else np.roll(j, -1)
    a = idx[:-1, j]
    b = idx[:-1, jn]
    c = idx[1:, j]
    d = idx[1:, jn]
    quads = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([b, d, c], -1).reshape(-1, 3)])
    top = np.stack([np.zeros(n_lon, int), idx[0, jn], idx[0, j]], -1)
    bottom_v = 1 + n_lat * cols
    bottom = np.stack([np.full(n_lon, bottom_v), idx[-1, j], idx[-1, jn]], -1)
    return np.concatenate([top, quads, bottom])


def _grid_uvs(v_rows, n_lon, box=(0.0, 0.0, 1.0, 1.0)):
    """UVs of a ``_grid_faces(..., uv=True)`` grid: u along the longitude, v per ring."""
    u0, v0, w, h = box
    u = np.arange(n_lon + 1) / n_lon
    uu, vv = np.meshgrid(u, v_rows, indexing="xy")
    ring = np.stack([uu, vv], -1).reshape(-1, 2)
    uv = np.concatenate([[[0.5, 1.0]], ring, [[0.5, 0.0]]])
    return uv * np.array([w, h]) + np.array([u0, v0])


def _sphere(n):
    """Unit UV sphere around +z (pole at +z): (vertices, faces, face_uvs, uvs)."""
    n_lat, n_lon = n, 2 * n
    th1 = np.linspace(0, np.pi, n_lat + 2)[1:-1]
    ph = np.arange(n_lon) / n_lon * 2 * np.pi
    th, ph = np.meshgrid(th1, ph, indexing="ij")
    ring = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]])
    f, flipped = _orient_outward(v, _grid_faces(n_lat, n_lon))
    fuv = _grid_faces(n_lat, n_lon, uv=True)
    if flipped:
        fuv = fuv[:, [0, 2, 1]]
    return v, f, fuv, _grid_uvs(1 - th1 / np.pi, n_lon, EYE_UV_BOX)


def _orient_outward(v, f):
    """Flip the winding if the normals point inwards; returns (faces, flipped)."""
    c = v.mean(0)
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    centre = v[f].mean(1) - c
    if np.sum(np.einsum("ij,ij->i", n, centre)) < 0:
        return f[:, [0, 2, 1]], True
    return f, False


def _head_surface(p, t, phi):
    """Head vertex positions (n_lat*n_lon+2, 3) for parameters ``p``."""
    # --- base: skull ellipsoid for t < t_neck, neck tube below
    th = np.pi * np.clip(t / 0.80, 0, 1)  # skull polar angle
    y_skull = p["head_cy"] + p["head_h"] * np.cos(th)
    r_skull = np.sin(th)
    t_n = 0.80
    neck = _smoothstep(0.68, 0.86, t)
    y_neck = p["head_cy"] - p["head_h"] * 0.93 - (t - t_n) * 420.0
    y = np.where(t < t_n, y_skull, y_neck)
    y = (1 - neck) * y_skull + neck * np.minimum(y, y_skull)
    y = np.where(t > t_n, y_neck, y)
    # horizontal radii
    ax = p["head_w"] * r_skull
    az = p["head_d"] * r_skull
    ax = (1 - neck) * ax + neck * 45.0
    az = (1 - neck) * az + neck * 47.0
    # jaw tapering: below the mouth the face narrows towards the chin
    jaw = _smoothstep(-10.0, p["chin_y"] + 5, y) * (1 - neck)
    ax = ax * (1 - (1 - p["jaw_w"]) * jaw)

    Y = np.broadcast_to(y[:, None], (t.size, phi.size))
    AX = ax[:, None]
    AZ = az[:, None]
    cphi, sphi = np.cos(phi)[None, :], np.sin(phi)[None, :]
    front = np.clip(cphi, 0, None)
    ex = 2.0 / np.where(cphi > 0, p["face_flat"], 2.0)  # flatter front half
    X = AX * np.sign(sphi) * np.abs(sphi) ** ex
    Z = AZ * np.sign(cphi) * np.abs(cphi) ** ex
    # the neck sits behind the face
    Z = Z - 24.0 * np.broadcast_to(neck[:, None], Z.shape)

    # --- facial features as displacements along z (front) / x (ears)
    fm = front ** 0.5 * (1 - np.broadcast_to(neck[:, None], Z.shape))  # front weight
    dz = np.zeros_like(X)
    ax_ = np.abs(X)
    # forehead bulge and brow ridge
    dz += p["forehead"] * _gauss(X, Y, 0, p["brow_y"] + 28, 45, 20)
    dz += p["brow_h"] * (_gauss(ax_, Y, p["eye_x"] + 2, p["brow_y"], 20, 5.5))
    dz += 0.6 * p["brow_h"] * _gauss(X, Y, 0, p["brow_y"] - 3, 10, 6)
    # eye sockets
    dz -= p["eye_depth"] * _gauss(ax_, Y, p["eye_x"], p["eye_y"], 15, 9.5)
    dz -= 0.35 * p["eye_depth"] * _gauss(ax_, Y, p["eye_x"] - 14, p["eye_y"] + 2, 5, 7)
    # nose: bridge + tip + nostrils, with a dent at the base
    ny0 = p["eye_y"] + 2
    nyt = ny0 - p["nose_len"]
    tt = np.clip((ny0 - Y) / p["nose_len"], 0, 1.15)
    ridge_h = p["nose_proj"] * (0.32 + 0.68 * tt ** 1.4) * (Y <= ny0 + 6)
    ridge_h *= np.exp(-0.5 * ((Y - nyt) / 7.0) ** 2 * (Y < nyt))  # drop below the tip
    ridge_w = 5.5 + 6.0 * tt
    dz += ridge_h * np.exp(-0.5 * (X / ridge_w) ** 2) * _smoothstep(ny0 + 14, ny0 - 2, Y)
    dz += 0.25 * p["nose_proj"] * _gauss(X, Y, 0, nyt + 3, 8, 6)
    dz += 0.40 * p["nose_proj"] * _gauss(ax_, Y, p["nose_w"] - 3, nyt - 2, 5.5, 5.0)
    dz -= 5.0 * _gauss(ax_, Y, p["nose_w"] + 3, nyt - 2, 3.0, 4.0)  # alar crease
    dz -= 2.5 * _gauss(ax_, Y, 4.0, nyt - 6, 2.5, 1.5)  # nostril openings
    # cheeks
    dz += p["cheek"] * _gauss(ax_, Y, 44, p["eye_y"] - 26, 16, 14)
    # mouth: muzzle, lips, and the line between them
    my = p["mouth_y"]
    dz += 8.0 * _gauss(X, Y, 0, my + 2, p["mouth_w"] + 8, 16)
    lip_x = np.clip(1 - (X / (p["mouth_w"] + 2)) ** 2, 0, 1) ** 0.7
    dz += p["lip_full"] * lip_x * np.exp(-0.5 * ((Y - (my + 5.0)) / 3.2) ** 2)
    dz += 1.15 * p["lip_full"] * lip_x * np.exp(-0.5 * ((Y - (my - 5.5)) / 3.8) ** 2)
    dz += 2.5 * _gauss(X, Y, 0, my + 11, 5, 3)  # philtrum ridge
    dz -= 3.5 * lip_x * np.exp(-0.5 * ((Y - my) / 1.3) ** 2)  # mouth line
    dz -= 3.0 * _gauss(X, Y, 0, my - 16, 14, 4)  # mentolabial sulcus
    # chin
    dz += p["chin_fwd"] * _gauss(X, Y, 0, p["chin_y"] + 12, 20, 10)
    Z = Z + dz * fm
    # ears: outward bumps on the sides
    side = np.clip(np.abs(sphi) - 0.6, 0, None) / 0.4 * (cphi < 0.3)
    ear = p["ear"] * np.exp(-0.5 * (((Y - (p["eye_y"] - 8)) / 20) ** 2 + ((cphi + 0.05) / 0.16) ** 2)) * side
    X = X + np.sign(sphi) * ear
    ring = np.stack([X, Y, Z], -1).reshape(-1, 3)
    top = np.array([[0.0, p["head_cy"] + p["head_h"], 0.0]])
    bottom = np.array([[0.0, y_neck[-1] - 4.0, -24.0]])
    return np.concatenate([top, ring, bottom])


def _eyeball_centres(p, head):
    """Eyeball centres: the cornea sits ``EYE_SINK`` behind the (unpushed) skin
    at the eye's centre, so the lids cover the eyeball's edges."""
    out = []
    for sx in (1.0, -1.0):  # subject's left (+x) first
        d = (head[:, 0] - sx * p["eye_x"]) ** 2 + (head[:, 1] - p["eye_y"]) ** 2 - 1e3 * (head[:, 2] > 0)
        z_skin = head[np.argmin(d), 2]
        out.append([sx * p["eye_x"], p["eye_y"], z_skin - EYE_SINK - EYE_RADIUS])
    return np.array(out)


def _lid_opening(x, y, p):
    """Almond-shaped opening in (0, 1) around each eye (centre weight 1)."""
    ax_ = np.abs(x)
    u = (ax_ - p["eye_x"]) / 12.5
    v = (y - p["eye_y"] - 0.8) / (6.0 * np.clip(1 - u ** 2, 0, 1) ** 0.6 + 1e-3)
    r = u ** 2 + v ** 2
    return 1 - _smoothstep(0.55, 1.0, r)


def _build_shape(p, t, phi, eye_unit, with_aux=False):
    head = _head_surface(p, t, phi)
    centres = _eyeball_centres(p, head)
    # push the skin inside the lid openings behind the eyeball
    op = _lid_opening(head[:, 0], head[:, 1], p) * (head[:, 2] > 40)
    head = head.copy()
    head[:, 2] -= LID_PUSH * op
    eyes = [eye_unit * EYE_RADIUS + c for c in centres]  # subject's left (+x) first
    v = np.concatenate([head] + eyes)
    if with_aux:
        return v, np.concatenate([op, np.zeros(len(v) - len(op))])
    return v


# ----------------------------------------------------------------------------
# landmarks


def _landmark_targets(p):
    """(68, 2) target (x, y) positions of the iBUG points on the front view.

    iBUG numbering follows the subject's anatomy as seen in a photo: point 0
    is on the subject's right (image left, -x here), and 36-41 is the
    subject's right eye.
    """
    ex, ey, my, mw = p["eye_x"], p["eye_y"], p["mouth_y"], p["mouth_w"]
    pts = []
    # jaw 0..16: from the right ear level round the chin to the left
    for k in range(17):
        a = (k / 16.0) * np.pi  # 0 .. pi
        w = p["head_w"] * (0.98 - 0.2 * np.sin(a) ** 4)
        x = -np.cos(a) * w * (0.75 + 0.25 * (1 - np.sin(a)))
        yy = (ey - 8) - (ey - 8 - p["chin_y"] - 7) * np.sin(a) ** 1.6
        pts.append((x, yy))
    # brows 17..21 (right brow, outer to inner), 22..26 (left brow, inner to outer)
    for k in range(5):
        x = -(ex + 18 - 9.0 * k)
        pts.append((x, p["brow_y"] + 2.0 * np.sin(np.pi * (k + 0.5) / 5.5) - 1))
    for k in range(5):
        x = ex - 18 + 9.0 * k + 4
        pts.append((x, p["brow_y"] + 2.0 * np.sin(np.pi * (4.5 - k) / 5.5) - 1))
    # nose bridge 27..30 (top to tip), base 31..35 (right to left)
    ny0 = ey + 2
    nyt = ny0 - p["nose_len"]
    for k in range(4):
        pts.append((0.0, ny0 - 3 - (ny0 - 3 - nyt) * k / 3.0))
    for k in range(5):
        pts.append(((k - 2) * p["nose_w"] * 0.45, nyt - 6 + 1.5 * (abs(k - 2) == 1)))
    # eyes 36..41 (right eye) and 42..47 (left eye), from outer/inner corner clockwise in the image
    # right eye (at -x): 36 outer corner (image left), 39 inner corner
    for ang in (180, 120, 60, 0, -60, -120):
        a = math.radians(ang)
        pts.append((-ex + 12.0 * math.cos(a), ey + 0.8 + 4.3 * math.sin(a) * (abs(math.cos(a)) < 0.9)))
    # left eye (at +x): 42 inner corner (image left), 45 outer corner
    for ang in (180, 120, 60, 0, -60, -120):
        a = math.radians(ang)
        pts.append((ex + 12.0 * math.cos(a), ey + 0.8 + 4.3 * math.sin(a) * (abs(math.cos(a)) < 0.9)))
    # outer lip 48..59: right corner, upper lip to left corner, lower lip back
    for ang in (180, 150, 120, 90, 60, 30, 0, -30, -60, -90, -120, -150):
        a = math.radians(ang)
        up = 10.0 if ang > 0 else 12.0
        pts.append((mw * math.cos(a), my + (up * math.sin(a) if ang not in (180, 0) else 0.0) + (-1.5 if ang == 90 else 0)))
    # inner lip 60..67
    for ang in (180, 120, 90, 60, 0, -60, -90, -120):
        a = math.radians(ang)
        pts.append(((mw - 3) * math.cos(a), my + 1.0 * math.sin(a)))
    return np.array(pts)


def _landmark_indices(verts, n_head, p, normals, neckw):
    tg = _landmark_targets(p)
    hv = verts[:n_head]
    ok = (hv[:, 2] > 0) & (normals[:n_head, 2] > -0.2) & (neckw[:n_head] < 0.25)
    cand = np.nonzero(ok)[0]
    d = ((hv[cand, None, :2] - tg[None]) ** 2).sum(-1)
    # prefer the front-most surface among near-ties (the silhouette points)
    d = d - 1e-3 * hv[cand, 2:3]
    return cand[np.argmin(d, axis=0)].astype(np.int32)


def _np_vertex_normals(v, f):
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, f[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------
# expressions


def _expressions(v, n_head, p, eye_ranges, op, neckw):
    """(V, 3, n) displacement fields of the named expressions at the mean head."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    head = np.zeros(len(v), bool)
    head[:n_head] = True
    front = np.clip(z / p["head_d"], 0, 1) * head
    ax_ = np.abs(x)
    my = p["mouth_y"]
    out = {}

    # jaw_open: rotate the lower face about a horizontal axis near the ears
    w = _smoothstep(my + 0.6, my - 1.6, y) * head * _smoothstep(-40.0, 10.0, z) * (1 - neckw) ** 2
    ang = math.radians(15.0)
    py, pz = y - (p["eye_y"] - 10), z - (-5.0)
    ry = py * math.cos(ang) - pz * math.sin(ang)
    rz = py * math.sin(ang) + pz * math.cos(ang)
    d = np.zeros_like(v)
    d[:, 1] = (ry - py) * w
    d[:, 2] = (rz - pz) * w
    out["jaw_open"] = d

    # smile: mouth corners up and outwards, cheeks up
    corner = np.exp(-0.5 * (((ax_ - p["mouth_w"]) / 12) ** 2 + ((y - my) / 12) ** 2)) * front
    cheek = _gauss(ax_, y, 40, my + 25, 14, 12) * front
    d = np.zeros_like(v)
    d[:, 0] = np.sign(x) * 5.0 * corner
    d[:, 1] = 6.0 * corner + 3.0 * cheek
    d[:, 2] = -2.5 * corner + 2.5 * cheek
    out["smile"] = d

    # brow_raise / brow_frown
    brow = np.exp(-0.5 * ((y - p["brow_y"]) / 16.0) ** 2 * (y < p["brow_y"]) - 0.5 * ((y - p["brow_y"]) / 30.0) ** 2 * (y >= p["brow_y"]))
    brow = brow * _smoothstep(p["eye_y"] + 2, p["eye_y"] + 10, y) * front * (ax_ < 70)
    d = np.zeros_like(v)
    d[:, 1] = 6.0 * brow
    out["brow_raise"] = d
    inner = _gauss(ax_, y, 14, p["brow_y"] - 2, 12, 8) * front
    d = np.zeros_like(v)
    d[:, 0] = -np.sign(x) * 3.0 * inner
    d[:, 1] = -4.0 * inner
    d[:, 2] = 1.5 * inner
    out["brow_frown"] = d

    # blinks: bring the skin in the lid opening back in front of the eyeball
    for name, sgn in (("blink_left", 1.0), ("blink_right", -1.0)):
        m = op * (np.sign(x) == sgn)
        d = np.zeros_like(v)
        d[:, 2] = (LID_PUSH + 1.0) * m
        d[:, 1] = -1.0 * m
        out[name] = d

    # pucker: lips forward and together
    lips = np.exp(-0.5 * ((x / (p["mouth_w"] + 6)) ** 2 + ((y - my) / 9.0) ** 2)) * front
    d = np.zeros_like(v)
    d[:, 0] = -0.35 * x * lips
    d[:, 2] = 8.0 * lips
    out["pucker"] = d

    # cheek_puff
    puff = _gauss(ax_, y, 38, my + 8, 15, 15) * front
    d = np.zeros_like(v)
    d[:, 0] = np.sign(x) * 7.0 * puff
    d[:, 2] = 4.0 * puff
    out["cheek_puff"] = d

    # mouth_left / mouth_right: the mouth slides sideways
    mouth = np.exp(-0.5 * ((x / (p["mouth_w"] + 12)) ** 2 + ((y - my) / 11.0) ** 2)) * front
    for name, sgn in (("mouth_left", 1.0), ("mouth_right", -1.0)):
        d = np.zeros_like(v)
        d[:, 0] = sgn * 7.0 * mouth
        d[:, 2] = -1.0 * mouth * (np.sign(x) == -sgn)
        out[name] = d

    # eyeballs stay put for every expression
    (l0, l1), (r0, r1) = eye_ranges
    for d in out.values():
        d[l0:l1] = 0
        d[r0:r1] = 0
    return np.stack([out[n] for n in EXPRESSION_NAMES], -1)


# ----------------------------------------------------------------------------
# albedo


def _albedo_layers(v, n_head, p, eye_ranges, op, eye_unit):
    """Per-vertex masks used to paint the albedo."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    ax_ = np.abs(x)
    head = np.zeros(len(v), bool)
    head[:n_head] = True
    front = (z > 20) & head
    L = {}
    lip_x = np.clip(1 - (x / (p["mouth_w"] + 1)) ** 2, 0, 1) ** 0.5
    my = p["mouth_y"]
    lip_up = lip_x * np.exp(-0.5 * ((y - (my + 4.2)) / 3.2) ** 4)
    lip_lo = lip_x * np.exp(-0.5 * ((y - (my - 5.0)) / 3.8) ** 4)
    L["lips"] = np.clip(lip_up + lip_lo, 0, 1) * front
    L["mouth_line"] = lip_x ** 2 * np.exp(-0.5 * ((y - my + 0.5) / 1.5) ** 4) * front
    bx = (ax_ - p["eye_x"] - 2) / 20.0
    by = (y - p["brow_y"] - 2.0 + 4 * bx ** 2) / 3.0
    L["brows"] = np.exp(-0.5 * (bx ** 8 + by ** 4) * 2) * front
    L["cheeks"] = _gauss(ax_, y, 42, p["eye_y"] - 28, 14, 12) * front
    L["lid"] = np.clip(op * 1.0, 0, 1) * head
    # hair: top and back of the skull
    fz = np.clip(z / p["head_d"], -1, 1)
    front_line = p["brow_y"] + 32 - 10 * np.clip(ax_ / p["head_w"], 0, 1) ** 2
    side_line = p["eye_y"] + 12  # above the ears
    back_line = p["chin_y"] + 35  # the nape
    u = _smoothstep(-0.75, 0.1, fz)
    w = _smoothstep(0.1, 0.55, fz)
    hair_line = back_line * (1 - u) + side_line * u
    hair_line = hair_line * (1 - w) + front_line * w
    L["hair"] = _smoothstep(hair_line, hair_line + 5, y) * head
    # eyes: sclera everywhere, iris and pupil around the +z pole of each eyeball
    iris = np.zeros(len(v))
    pupil = np.zeros(len(v))
    sclera = np.zeros(len(v))
    for a, b in eye_ranges:
        cz = eye_unit[:, 2]
        sclera[a:b] = 1
        iris[a:b] = _smoothstep(IRIS_COS - 0.02, IRIS_COS + 0.02, cz)
        pupil[a:b] = _smoothstep(PUPIL_COS - 0.01, PUPIL_COS + 0.01, cz)
    L["sclera"], L["iris"], L["pupil"] = sclera, iris, pupil
    L["head"] = head.astype(float)
    return L


def _paint(L, q):
    """Albedo (V, 3) from layer masks and colour parameters ``q``."""
    skin = np.asarray(q["skin"])
    col = np.broadcast_to(skin, (len(L["head"]), 3)).copy()
    col = col * (1 - 0.25 * L["cheeks"][:, None]) + 0.25 * L["cheeks"][:, None] * (skin * np.array([1.08, 0.86, 0.86]))
    col = col * (1 - L["lid"][:, None] * 0.2) + 0.2 * L["lid"][:, None] * skin * 0.85
    for key in ("lips", "brows", "hair"):
        m = L[key][:, None]
        col = col * (1 - m) + m * np.asarray(q[key])
    m = L["mouth_line"][:, None]
    col = col * (1 - m) + m * np.array([0.25, 0.08, 0.08])
    eye = L["sclera"][:, None]
    col = col * (1 - eye) + eye * np.array([0.90, 0.88, 0.85])
    m = L["iris"][:, None]
    col = col * (1 - m) + m * np.asarray(q["iris"])
    m = L["pupil"][:, None]
    col = col * (1 - m) + m * np.array([0.03, 0.03, 0.03])
    return np.clip(col, 0, 1)


_COLOR_DEFAULTS = dict(
    skin=(0.80, 0.60, 0.50),
    lips=(0.66, 0.30, 0.30),
    brows=(0.22, 0.15, 0.11),
    hair=(0.20, 0.14, 0.10),
    iris=(0.30, 0.42, 0.55),
)


def _random_colors(rng):
    tone = rng.uniform(-1, 1)  # light .. dark
    base = np.array(_COLOR_DEFAULTS["skin"]) * (1 - 0.28 * tone) + rng.normal(0, 0.02, 3)
    red = rng.normal(0, 0.03)
    skin = np.clip(base + np.array([red, -0.3 * red, -0.3 * red]), 0.05, 0.98)
    lips = np.clip(skin * np.array([0.85, 0.52, 0.56]) + rng.normal(0, 0.03, 3), 0, 1)
    hair_tone = rng.uniform(0, 1) ** 2
    hair = np.clip(np.array([0.08, 0.06, 0.05]) + hair_tone * np.array([0.55, 0.40, 0.22]) + rng.normal(0, 0.01, 3), 0, 1)
    brows = np.clip(hair * 0.9 + 0.03, 0, 1)
    iris_choice = rng.uniform(0, 1)
    iris = (1 - iris_choice) * np.array([0.30, 0.18, 0.09]) + iris_choice * np.array([0.30, 0.45, 0.60])
    iris = np.clip(iris + rng.normal(0, 0.03, 3), 0, 1)
    return dict(skin=skin, lips=lips, brows=brows, hair=hair, iris=iris)


def _pca(samples, mean, k):
    """PCA of (N, D) samples around ``mean``: returns (D, k) basis scaled by
    sqrt(variance) and the variances (k,)."""
    X = (samples - mean).astype(np.float32)
    n = X.shape[0]
    # Gram-matrix trick: N << D
    # einsum without BLAS: OpenBLAS' first call can cost seconds on a busy machine
    G = np.einsum("id,jd->ij", X, X, optimize=False).astype(np.float64) / (n - 1)
    w, U = np.linalg.eigh(G)
    order = np.argsort(w)[::-1][:k]
    w = np.maximum(w[order], 0)
    U = U[:, order]
    comps = np.einsum("ik,id->dk", U.astype(np.float32), X, optimize=False).astype(np.float64)  # column norm^2 = (n-1) w
    norms = np.maximum(np.linalg.norm(comps, axis=0), 1e-12)
    basis = comps / norms * np.sqrt(w)
    # deterministic sign: largest-magnitude entry positive
    sgn = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(k)])
    sgn[sgn == 0] = 1
    return basis * sgn, w


@functools.lru_cache(maxsize=8)
def _build(resolution, n_id, n_exp, n_albedo, seed, n_population):
    rng = np.random.default_rng(seed)
    t, phi = _grid(resolution)
    n_lat, n_lon = t.size, phi.size
    head_faces, flipped = _orient_outward(_head_surface(DEFAULTS, t, phi), _grid_faces(n_lat, n_lon))
    head_fuv = _grid_faces(n_lat, n_lon, uv=True)
    if flipped:
        head_fuv = head_fuv[:, [0, 2, 1]]
    head_uv = _grid_uvs(0.99 - 0.98 * (t - t[0]) / (t[-1] - t[0]), n_lon)
    n_head = n_lat * n_lon + 2
    eye_res = max(8, resolution // 5)
    eye_unit, eye_faces, eye_fuv, eye_uv = _sphere(eye_res)
    n_eye = len(eye_unit)
    eye_ranges = ((n_head, n_head + n_eye), (n_head + n_eye, n_head + 2 * n_eye))
    faces = np.concatenate([head_faces, eye_faces + n_head, eye_faces + n_head + n_eye]).astype(np.int32)
    n_huv = len(head_uv)
    uvs = np.concatenate([head_uv, eye_uv]).astype(np.float32)
    face_uvs = np.concatenate([head_fuv, eye_fuv + n_huv, eye_fuv + n_huv]).astype(np.int32)

    # population of identities
    params = []
    for _ in range(n_population):
        p = {k: v + _VARIATION[k] * rng.normal() for k, v in DEFAULTS.items()}
        params.append(p)
    shapes = np.stack([_build_shape(p, t, phi, eye_unit).reshape(-1) for p in params])
    mean_p = dict(DEFAULTS)
    mean_v, op = _build_shape(mean_p, t, phi, eye_unit, with_aux=True)
    k_id = min(n_id, n_population - 1)
    id_basis, id_var = _pca(shapes, mean_v.reshape(-1), k_id)

    # expressions (at the default head)
    neckw = np.concatenate([[0.0], np.repeat(_smoothstep(0.68, 0.86, t), n_lon), [1.0], np.zeros(2 * n_eye)])
    exp = _expressions(mean_v, n_head, mean_p, eye_ranges, op, neckw)
    if n_exp > exp.shape[-1]:
        raise ValueError(f"n_exp must be <= {exp.shape[-1]} (the named expressions {EXPRESSION_NAMES}), got {n_exp}")
    exp = exp[..., :n_exp]

    # albedo
    layers = _albedo_layers(mean_v, n_head, mean_p, eye_ranges, op, eye_unit)
    mean_alb = _paint(layers, {k: np.array(v) for k, v in _COLOR_DEFAULTS.items()})
    cols = np.stack([_paint(layers, _random_colors(rng)).reshape(-1) for _ in range(n_population)])
    k_alb = min(n_albedo, n_population - 1)
    alb_basis, alb_var = _pca(cols, mean_alb.reshape(-1), k_alb)

    normals = _np_vertex_normals(mean_v, faces)
    lmk = _landmark_indices(mean_v, n_head, mean_p, normals, neckw)

    V = mean_v.shape[0]
    face_mask = ((mean_v[:, 2] > 30) & (mean_v[:, 1] < mean_p["brow_y"] + 30) & (mean_v[:, 1] > mean_p["chin_y"] - 8)).astype(np.float32)
    face_mask[n_head:] = 1.0
    eyes = np.zeros(V, np.float32)
    eyes[n_head:] = 1
    skin = (1 - eyes) * (1 - np.clip(layers["hair"], 0, 1)) * (1 - np.clip(layers["brows"] + layers["lips"], 0, 1))
    masks = {"face": face_mask, "eyes": eyes, "skin": skin.astype(np.float32)}
    return dict(
        mean_shape=mean_v.astype(np.float32),
        id_basis=id_basis.reshape(V, 3, k_id).astype(np.float32),
        exp_basis=exp.astype(np.float32),
        mean_albedo=mean_alb.astype(np.float32),
        albedo_basis=alb_basis.reshape(V, 3, k_alb).astype(np.float32),
        faces=faces,
        landmark_indices=lmk,
        masks=masks,
        id_variance=id_var.astype(np.float32),
        exp_variance=np.ones(n_exp, np.float32),
        albedo_variance=alb_var.astype(np.float32),
        eye_ranges=eye_ranges,
        uvs=uvs,
        face_uvs=face_uvs,
    )


def synthetic_face_model(resolution: int = 96, n_id: int = 40, n_exp: int = len(EXPRESSION_NAMES), n_albedo: int = 20,
                         seed: int = 0, n_population: int = 80, scale: float = 1.0):
    """Build the procedural face model.

    Args:
      resolution: rings of the head's latitude-longitude grid; the head has
        ``2 * resolution**2 + 2`` vertices plus two eyeballs
        (48 -> ~5k, 96 -> ~19k, 156 -> ~50k vertices). Sampling is denser on
        the face than on the back of the head.
      n_id: identity components (at most ``n_population - 1``).
      n_exp: expression blendshapes, the first ``n_exp`` of
        :data:`EXPRESSION_NAMES` (``jaw_open``, ``smile``, ``brow_raise``,
        ``brow_frown``, ``blink_left``, ``blink_right``, ``pucker``,
        ``cheek_puff``, ``mouth_left``, ``mouth_right``); coefficient 1 is the
        full expression.
      n_albedo: albedo components (at most ``n_population - 1``).
      seed: seed of the random population (identity and albedo).
      n_population: number of random heads the PCA is computed from.
      scale: multiplies all positions (``0.01`` gives decimetres, the scale
        FaceVerse's and Deep3DFaceRecon's cameras at distance 10 expect;
        ``0.001`` metres).

    Returns:
      A :class:`~jaxrender.morphable.MorphableModel` in millimetres (BFM frame:
      x to the subject's left, y up, z towards the viewer) with
      ``landmark_indices`` in the iBUG 68-point layout (jaw 0-16 starting on
      the subject's right, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67),
      ``masks`` ``"face"``, ``"skin"`` and ``"eyes"``, ``eye_ranges``
      (subject's left eyeball first) and UVs (``uvs``, ``face_uvs``: a
      cylindrical map of the head with the face at the centre, u = 0.5, the
      crown at the top and a seam at the back; both eyeballs share the
      corner ``[0, 0.08]^2``). Deterministic for a given argument set;
      results are cached, so repeated calls are cheap.
    """
    from jaxrender.morphable.model import MorphableModel

    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    if n_population < 2:
        raise ValueError(f"n_population must be >= 2, got {n_population}")
    d = _build(int(resolution), int(n_id), int(n_exp), int(n_albedo), int(seed), int(n_population))
    s = np.float32(scale)
    return MorphableModel(
        d["mean_shape"] * s, d["id_basis"] * s, d["exp_basis"] * s, d["mean_albedo"], d["albedo_basis"], d["faces"],
        d["landmark_indices"], masks=d["masks"], id_variance=d["id_variance"] * s * s, exp_variance=d["exp_variance"],
        albedo_variance=d["albedo_variance"], eye_ranges=d["eye_ranges"], landmark_names=IBUG68_NAMES,
        uvs=d["uvs"], face_uvs=d["face_uvs"],
    )
