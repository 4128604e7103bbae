"""Hand-placed 68 iBUG landmarks for scikit-image's astronaut portrait.

``skimage.data.astronaut()`` is 512 x 512; the positions are ``(x, y)`` pixel
coordinates in that image (x = column, y = row, pixel centres at +0.5 not
applied: the values are read off a zoomed grid). Layout: jaw 0-16 from the
subject's right (the viewer's left), brows 17-26, nose 27-35, eyes 36-47
(36-41 the subject's right eye), mouth 48-67. Placed by eye on a zoomed
picture with a grid; expect errors of about a pixel (the jaw line, a
contour, is less certain than the eye and mouth corners).
"""

LANDMARKS = [
    # jaw 0-16
    (181.0, 103.0), (181.0, 114.0), (182.0, 125.0), (184.0, 136.0), (186.0, 147.0), (188.5, 157.0),
    (194.0, 166.0), (205.0, 174.0), (225.0, 179.0), (238.0, 177.0), (250.0, 171.0), (255.0, 162.0),
    (258.0, 152.0), (261.0, 141.0), (266.0, 130.0), (269.0, 119.0), (271.0, 107.0),
    # brows 17-21 (subject's right, outer -> inner), 22-26 (left, inner -> outer)
    (189.0, 91.0), (195.0, 88.0), (201.0, 87.0), (207.0, 88.0), (213.0, 91.0),
    (235.0, 93.0), (241.0, 91.0), (247.0, 91.0), (253.0, 92.0), (259.0, 95.0),
    # nose bridge 27-30, nostrils 31-35
    (223.0, 102.0), (223.0, 110.0), (223.0, 118.0), (223.0, 126.0),
    (215.0, 130.0), (219.0, 131.0), (223.0, 132.0), (228.0, 131.0), (232.0, 130.0),
    # right eye 36-41 (outer corner, upper lid, inner corner, lower lid)
    (193.0, 100.0), (198.0, 97.5), (204.0, 97.5), (210.0, 101.5), (204.0, 103.5), (198.0, 103.0),
    # left eye 42-47 (inner corner, upper lid, outer corner, lower lid)
    (237.0, 103.5), (242.0, 100.0), (248.0, 99.5), (258.0, 102.5), (249.0, 105.5), (243.0, 105.5),
    # outer lips 48-59 (left corner, upper lip, right corner, lower lip)
    (203.0, 139.5), (209.0, 138.0), (216.0, 137.0), (222.0, 138.0), (229.0, 137.0), (236.0, 138.0),
    (243.0, 140.0), (238.0, 148.0), (231.0, 152.0), (223.0, 153.5), (215.0, 152.0), (208.0, 147.0),
    # inner lips 60-67
    (205.0, 140.0), (213.0, 142.5), (222.0, 143.0), (231.0, 142.5), (241.0, 140.5),
    (231.0, 149.0), (222.0, 150.0), (213.0, 149.0),
]

assert len(LANDMARKS) == 68


def load(size, crop=(0, 0, 512)):
    """The astronaut photo (sRGB in ``[0, 1]``) and these landmarks, cropped and resized.

    ``crop`` is ``(row, col, side)`` of a square of the 512² image; it is
    resized to ``size``² and the landmarks are mapped to its pixel coordinates.
    """
    import numpy as np
    from skimage import data
    from skimage.transform import resize

    r0, c0, side = crop
    img = data.astronaut()[r0:r0 + side, c0:c0 + side].astype(np.float32) / 255.0
    img = resize(img, (size, size), anti_aliasing=True).astype(np.float32)
    lm = (np.asarray(LANDMARKS, np.float32) - np.array([c0, r0], np.float32)) * (size / side)
    return img, lm
