"""Strict test doubles of the Qt/CTK widgets, the scripted-module base classes and parameterNodeWrapper,
for running the module widgets outside Slicer (MRML stays real, from slicer-core).

Strict: a widget double has only the properties and methods its Qt/CTK class has (and the module uses);
reading or setting anything else raises ``AttributeError``, as PythonQt does. Modelled after Slicer's
sources (v5.6-5.8):

- ``connectGui`` (slicer/parameterNodeWrapper/guiConnectors.py): a widget with the ``SlicerParameterName``
  property is bound to that parameter; an ``int`` on a QSpinBox gets the range of its ``Minimum`` /
  ``Maximum`` / ``WithinRange`` annotations, else -2**31 .. 2**31-1 (the .ui range is overwritten); a
  ``float`` on a QDoubleSpinBox likewise, else -inf .. inf; connecting writes the parameter's value into
  the widget, widget changes are written to the parameter and parameter changes to the widget until
  ``disconnectGui``. A pairing no connector handles raises ``RuntimeError``.
- The module lifecycle (ScriptedLoadableModuleTemplate and qSlicerAbstractModuleWidget): ``setup()`` once,
  then ``enter()`` each time the module is shown and ``exit()`` each time another module is shown;
  ``parent.isEntered`` says which. :func:`showModule` / :func:`leaveModule` play that part.
- Spin boxes clamp values to their range, and show ``specialValueText`` at the minimum.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
import unittest
import uuid
import xml.etree.ElementTree as ET
from unittest import mock


class StrictWidget:
    """Base of the widget doubles: signals, and only the attributes listed in PROPERTIES (or defined)."""

    PROPERTIES = {"enabled", "visible", "toolTip", "objectName"}
    SIGNALS: set = set()

    def __init__(self, name):
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_blocked", False)
        object.__setattr__(self, "slicerParameterName", None)  # the .ui's dynamic SlicerParameterName
        self.objectName = name
        self.enabled = True
        self.visible = True
        self.toolTip = ""

    @classmethod
    def _inherited(cls, attribute):
        """The union of ``attribute`` (PROPERTIES or SIGNALS) over the class and its bases."""
        return set().union(*(getattr(klass, attribute, set()) for klass in cls.__mro__))

    @classmethod
    def _allProperties(cls):
        return cls._inherited("PROPERTIES")

    @classmethod
    def _allSignals(cls):
        return cls._inherited("SIGNALS")

    def __setattr__(self, name, value):
        if name.startswith("_") or name in self._allProperties() or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"{type(self).__name__} '{self.objectName}' has no property '{name}'")

    def __getattr__(self, name):  # only called for attributes that do not exist
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{type(self).__name__} '{self.__dict__.get('objectName')}' has no attribute '{name}'")

    # --- Qt API
    def connect(self, signal, slot):
        if signal not in self._allSignals():
            raise AttributeError(f"{type(self).__name__} '{self.objectName}' has no signal {signal}")
        self._slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot):
        slots = self._slots.get(signal, [])
        if slot in slots:
            slots.remove(slot)
            return True
        return False

    def blockSignals(self, block):
        previous = self._blocked
        object.__setattr__(self, "_blocked", bool(block))
        return previous

    def hide(self):
        self.visible = False

    def show(self):
        self.visible = True

    def setVisible(self, visible):
        self.visible = bool(visible)

    # --- test helpers
    def emit(self, signal, *args):
        """Call the connected slots; as PythonQt, a slot that takes fewer arguments than the signal carries
        gets the first ones (the scripted-module template connects ``clicked(bool)`` to ``onApplyButton(self)``)."""
        if self._blocked:
            return
        for slot in list(self._slots.get(signal, [])):
            slot(*args[:_positionalCount(slot, len(args))])

    def connections(self, signal) -> int:
        return len(self._slots.get(signal, []))


def _positionalCount(slot, available: int) -> int:
    """How many positional arguments ``slot`` takes, at most ``available``."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class FakeLabel(StrictWidget):
    PROPERTIES = {"text", "wordWrap"}

    def __init__(self, name):
        super().__init__(name)
        self.text = ""


class FakePushButton(StrictWidget):
    PROPERTIES = {"text", "checkable", "checked"}
    SIGNALS = {"clicked(bool)", "clicked()", "toggled(bool)"}

    def __init__(self, name):
        super().__init__(name)
        self.text = ""
        self.checkable = False
        self.checked = False

    def click(self):
        """As QAbstractButton::click: nothing happens while the button is disabled."""
        if not self.enabled:
            return
        self.emit("clicked(bool)", False)
        self.emit("clicked()")


class FakeCollapsibleButton(FakePushButton):
    PROPERTIES = {"collapsed"}

    def __init__(self, name):
        super().__init__(name)
        self.collapsed = False


class FakeContainer(StrictWidget):
    def setMRMLScene(self, scene):
        pass


class FakeProgressBar(StrictWidget):
    PROPERTIES = {"minimum", "maximum", "value"}

    def __init__(self, name):
        super().__init__(name)
        self.minimum, self.maximum, self.value = 0, 100, 0

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def setValue(self, value):
        self.value = value


class FakePlainTextEdit(StrictWidget):
    PROPERTIES = {"plainText", "readOnly"}

    def __init__(self, name):
        super().__init__(name)
        self.plainText = ""
        self.readOnly = True
        self._maximumBlockCount = 0

    def setMaximumBlockCount(self, count):
        self._maximumBlockCount = count

    def clear(self):
        self.plainText = ""

    def appendPlainText(self, text):
        self.plainText = (self.plainText + "\n" + text) if self.plainText else text

    def toPlainText(self):
        return self.plainText


class FakeListWidget(StrictWidget):
    SIGNALS = {"currentRowChanged(int)"}

    def __init__(self, name):
        super().__init__(name)
        self._items = []
        self._row = -1

    @property
    def count(self):
        return len(self._items)

    @property
    def currentRow(self):
        return self._row

    def clear(self):
        self._items = []
        self.setCurrentRow(-1)

    def addItem(self, text):
        self._items.append(str(text))

    def setCurrentRow(self, row):
        if row != self._row:
            self._row = row
            self.emit("currentRowChanged(int)", row)

    def itemTexts(self):  # test helper
        return list(self._items)


class FakeCheckBox(StrictWidget):
    PROPERTIES = {"text"}
    SIGNALS = {"toggled(bool)", "stateChanged(int)"}

    def __init__(self, name):
        super().__init__(name)
        self.text = ""
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.emit("toggled(bool)", self._checked)
            self.emit("stateChanged(int)", 2 if self._checked else 0)


class FakeSpinBox(StrictWidget):
    """QSpinBox: the value is clamped to [minimum, maximum]; at the minimum ``specialValueText`` shows."""

    PROPERTIES = {"specialValueText", "suffix", "prefix", "singleStep", "decimals"}
    SIGNALS = {"valueChanged(int)", "valueChanged(double)"}
    cast = int

    def __init__(self, name):
        super().__init__(name)
        self._minimum, self._maximum, self._value = self.cast(0), self.cast(99), self.cast(0)
        self.specialValueText = ""
        self.suffix = ""
        self.prefix = ""
        self.singleStep = 1
        self.decimals = 2

    def _bound(self, value):
        return self.cast(value) if math.isfinite(value) else value

    @property
    def minimum(self):
        return self._minimum

    @minimum.setter
    def minimum(self, value):  # a maximum below the new minimum follows it, as in Qt
        self.setRange(value, max(self._maximum, self._bound(value)))

    @property
    def maximum(self):
        return self._maximum

    @maximum.setter
    def maximum(self, value):  # a minimum above the new maximum follows it
        self.setRange(min(self._minimum, self._bound(value)), value)

    def setMinimum(self, value):
        self.minimum = value

    def setMaximum(self, value):
        self.maximum = value

    def setRange(self, minimum, maximum):
        """As QAbstractSpinBox: a maximum below the minimum becomes the minimum; the value is clamped."""
        self._minimum = self._bound(minimum)
        self._maximum = max(self._minimum, self._bound(maximum))
        self.value = self._value

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = self.cast(min(max(value, self._minimum), self._maximum))
        if value != self._value:
            self._value = value
            for signal in self._allSignals():
                self.emit(signal, value)

    def setValue(self, value):
        self.value = value

    def shownText(self):  # test helper: what the user sees in the box
        if self.specialValueText and self._value == self._minimum:
            return self.specialValueText
        return f"{self.prefix}{self._value}{self.suffix}"


class FakeDoubleSpinBox(FakeSpinBox):
    cast = float


class FakeComboBox(StrictWidget):
    SIGNALS = {"currentIndexChanged(int)"}

    def __init__(self, name):
        super().__init__(name)
        self._items = []  # (text, data, tooltip)
        self._index = -1

    def addItem(self, text, data=None):
        self._items.append([text, data, ""])
        if self._index < 0:
            self.setCurrentIndex(0)

    def clear(self):
        self._items = []
        self.setCurrentIndex(-1)

    def findData(self, data):
        return next((i for i, item in enumerate(self._items) if item[1] == data), -1)

    def setCurrentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    def setItemData(self, index, value, role=None):
        self._items[index][2] = value

    def itemText(self, index):
        return self._items[index][0]

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        self.setCurrentIndex(index)

    @property
    def count(self):
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self._index][1] if 0 <= self._index < len(self._items) else None

    @property
    def currentText(self):
        return self._items[self._index][0] if 0 <= self._index < len(self._items) else ""


PATH_HISTORY: dict = {}
"""ctkPathLineEdit's history in the application settings: settingKey -> [paths], most recent first."""


class FakePathLineEdit(StrictWidget):
    """ctkPathLineEdit: setting ``settingKey`` retrieves the history saved under it and, when no path is set,
    shows its most recent entry without emitting currentPathChanged (ctkPathLineEdit::retrieveHistory);
    ``addCurrentPathToHistory`` saves the current path first in that history."""

    PROPERTIES = {"filters", "nameFilters", "showHistoryButton"}
    SIGNALS = {"currentPathChanged(QString)"}

    def __init__(self, name):
        super().__init__(name)
        self._path = ""
        self.filters = 0
        self.nameFilters = []
        self._settingKey = ""

    @property
    def settingKey(self):
        return self._settingKey

    @settingKey.setter
    def settingKey(self, key):
        self._settingKey = str(key)
        history = PATH_HISTORY.get(self._settingKey) or []
        if history and not self._path:
            self._path = history[0]  # signals blocked, as retrieveHistory does

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, value):
        value = str(value)
        if value != self._path:
            self._path = value
            self.emit("currentPathChanged(QString)", value)

    def addCurrentPathToHistory(self):
        if self._settingKey and self._path:
            history = [p for p in PATH_HISTORY.get(self._settingKey, []) if p != self._path]
            PATH_HISTORY[self._settingKey] = [self._path] + history

    def history(self):  # test helper
        return list(PATH_HISTORY.get(self._settingKey, []))


class FakeNodeComboBox(StrictWidget):
    PROPERTIES = {"nodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "renameEnabled"}
    SIGNALS = {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "checkedNodesChanged()"}

    def __init__(self, name):
        super().__init__(name)
        self._node = None
        self._checked = []

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def checkedNodes(self):
        return list(self._checked)

    def setMRMLScene(self, scene):
        pass

    def setCheckedNodes(self, nodes):  # test helper (qMRMLCheckableNodeComboBox: checking in the list)
        self._checked = list(nodes)
        self.emit("checkedNodesChanged()")


WIDGETS = {"QLabel": FakeLabel, "QPushButton": FakePushButton, "ctkCollapsibleButton": FakeCollapsibleButton,
           "QWidget": FakeContainer, "qMRMLWidget": FakeContainer, "QProgressBar": FakeProgressBar,
           "QPlainTextEdit": FakePlainTextEdit, "QListWidget": FakeListWidget, "QCheckBox": FakeCheckBox,
           "QSpinBox": FakeSpinBox, "QDoubleSpinBox": FakeDoubleSpinBox, "QComboBox": FakeComboBox,
           "ctkPathLineEdit": FakePathLineEdit, "qMRMLNodeComboBox": FakeNodeComboBox,
           "qMRMLCheckableNodeComboBox": FakeNodeComboBox}

_UI_PROPERTIES = ("minimum", "maximum", "value", "specialValueText", "suffix", "prefix", "decimals", "text", "checked")


def _uiValue(element):
    for kind, convert in (("number", int), ("double", float), ("string", str),
                          ("bool", lambda v: v.strip().lower() == "true")):
        child = element.find(kind)
        if child is not None:
            return convert(child.text or "")
    return None


def fakeUi(root, module):
    """The module's widgets from its .ui file, as strict doubles with the .ui's property values."""
    tree = ET.parse(os.path.join(root, module, "Resources", "UI", f"{module}.ui"))
    widgets = {}
    for element in tree.iter("widget"):
        className = element.get("class")
        if className not in WIDGETS:
            raise AssertionError(f"{module}.ui uses {className}: add a strict double for it")
        widget = WIDGETS[className](element.get("name"))
        for prop in element.findall("property"):
            name, value = prop.get("name"), _uiValue(prop)
            if name == "SlicerParameterName":
                object.__setattr__(widget, "slicerParameterName", value)
            elif name in _UI_PROPERTIES and value is not None and (
                    name in widget._allProperties() or isinstance(getattr(type(widget), name, None), property)):
                setattr(widget, name, value)
        widgets[element.get("name")] = widget
    return types.SimpleNamespace(**widgets)


class FakeSettings:
    """QSettings (``slicer.app.userSettings()``): string values by key; ``value(key)`` is None when unset."""

    def __init__(self):
        self.values = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


# ----------------------------------------------------------------------------------- parameterNodeWrapper


@dataclasses.dataclass
class Minimum:
    minimum: float


@dataclasses.dataclass
class Maximum:
    maximum: float


@dataclasses.dataclass
class WithinRange:
    minimum: float
    maximum: float


def _split(datatype):
    if typing.get_origin(datatype) is typing.Annotated:
        base, *annotations = typing.get_args(datatype)
        return base, annotations
    return datatype, []


def _first(annotations, kind):
    return next((a for a in annotations if isinstance(a, kind)), None)


class _Connector:
    """One widget <-> one parameter, as guiConnectors.py does for the widget types used here."""

    def __init__(self, widget, name, datatype):
        base, annotations = _split(datatype)
        self.widget, self.name = widget, name
        if isinstance(widget, FakeSpinBox) and base is (float if isinstance(widget, FakeDoubleSpinBox) else int):
            within = _first(annotations, WithinRange)
            low, high = _first(annotations, Minimum), _first(annotations, Maximum)
            unbounded = (float("-inf"), float("inf")) if base is float else (-2 ** 31, 2 ** 31 - 1)
            if within is not None:
                widget.setRange(within.minimum, within.maximum)
            else:
                widget.minimum = low.minimum if low is not None else unbounded[0]
                widget.maximum = high.maximum if high is not None else unbounded[1]
            self.signal = "valueChanged(double)" if base is float else "valueChanged(int)"
            self.read = lambda: widget.value
            self.write = lambda value: setattr(widget, "value", value)
        elif isinstance(widget, FakeCheckBox) and base is bool:
            self.signal = "toggled(bool)"
            self.read = lambda: widget.checked
            self.write = lambda value: setattr(widget, "checked", value)
        elif isinstance(widget, FakeNodeComboBox) and isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            self.signal = "currentNodeChanged(vtkMRMLNode*)"
            self.read = widget.currentNode
            self.write = widget.setCurrentNode
        else:
            raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type "
                               f"'{type(widget).__name__}'")


def fakeParameterNodeWrapper(cls):
    """Typed attributes kept in the scripted module node's parameters (as strings), ``connectGui`` /
    ``disconnectGui`` modelled after Slicer's (see the module docstring)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        def __init__(self, node):
            object.__setattr__(self, "_node", node)
            object.__setattr__(self, "_guis", {})
            if node.GetAttribute("fakeWrapperStore") is None:
                node.SetAttribute("fakeWrapperStore", uuid.uuid4().hex)
                _store(node).update(defaults)

        def __getattr__(self, name):
            if name in defaults:
                return _store(self._node)[name]
            raise AttributeError(f"{cls.__name__} has no parameter '{name}'")

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
            base, annotations = _split(hints[name])
            low, high = _first(annotations, Minimum), _first(annotations, Maximum)
            if low is not None and value is not None and value < low.minimum:
                raise ValueError(f"{name}: {value} is below the minimum {low.minimum}")
            if high is not None and value is not None and value > high.maximum:
                raise ValueError(f"{name}: {value} is above the maximum {high.maximum}")
            store = _store(self._node)
            if store.get(name) is not value and store.get(name) != value:
                store[name] = value
                self._node.Modified()

        @property
        def parameterNode(self):
            return self._node

        @staticmethod
        def dataType(name):
            return hints[name]

        def connectGui(self, gui):
            connectors = []
            for widget in vars(gui).values():
                name = getattr(widget, "slicerParameterName", None)
                if not name:
                    continue
                if name not in defaults:
                    raise ValueError(f"the .ui binds '{widget.objectName}' to '{name}', which {cls.__name__} lacks")
                connector = _Connector(widget, name, hints[name])
                connector.write(getattr(self, name))
                connector.slot = lambda *_args, c=connector: setattr(self, c.name, c.read())
                widget.connect(connector.signal, connector.slot)
                connectors.append(connector)

            def updateGui(*_args):
                for connector in connectors:
                    connector.write(getattr(self, connector.name))

            observer = self._node.AddObserver("ModifiedEvent", updateGui)
            tag = object()
            self._guis[tag] = (connectors, observer)
            return tag

        def disconnectGui(self, tag):
            connectors, observer = self._guis.pop(tag)
            for connector in connectors:
                connector.widget.disconnect(connector.signal, connector.slot)
            self._node.RemoveObserver(observer)

        def connectedGuiCount(self):  # test helper
            return len(self._guis)

        def AddObserver(self, event, method, priority=0.0):
            return self._node.AddObserver(event, method, priority)

        def RemoveObserver(self, tag):
            self._node.RemoveObserver(tag)

    Wrapped.__name__ = cls.__name__
    return Wrapped


_STORES: dict = {}


def _store(node):
    """The Python values of a parameter node (kept per node; the real wrapper serialises them into it)."""
    return _STORES.setdefault(node.GetAttribute("fakeWrapperStore"), {})


def parameterNodeWrapperModule():
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = fakeParameterNodeWrapper
    module.Minimum, module.Maximum, module.WithinRange = Minimum, Maximum, WithinRange
    return module


# ------------------------------------------------------------------------------ scripted module classes


class FakeModuleWidgetParent:
    """The qSlicerScriptedLoadableModuleWidget a module widget lives in: ``isEntered`` is True while the
    module is shown."""

    def __init__(self):
        self.isEntered = False


def scriptedLoadableModule(scene):
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            name = type(self).__name__  # as Slicer: the class name without "Widget"
            self.moduleName = name[:-len("Widget")] if name.endswith("Widget") else name
            self.parent = parent if isinstance(parent, FakeModuleWidgetParent) else FakeModuleWidgetParent()
            self.layout = mock.MagicMock(name="layout")
            self.developerMode = False

        def setup(self):
            pass

        def enter(self):
            pass

        def exit(self):
            pass

        def cleanup(self):
            pass

        def resourcePath(self, relative):
            return relative

        def onReload(self):  # Slicer: slicer.util.reloadScriptedModule(self.moduleName), the module file only
            module.reloaded.append(self.moduleName)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__

        def getParameterNode(self):
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
                node.SetSingletonTag(self.moduleName)
            return node

    module.reloaded = []  # test record of onReload calls
    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = unittest.TestCase
    return module


def showModule(widget):
    """The user selects the module (qSlicerAbstractModuleWidget::enter): isEntered, then enter()."""
    widget.parent.isEntered = True
    widget.enter()


def leaveModule(widget):
    """The user selects another module (e.g. the Segment Editor): exit(), then not entered."""
    widget.exit()
    widget.parent.isEntered = False


# ------------------------------------------------------------------------------ Segment Editor effects


class FakeScriptedEffect:
    """Strict double of ``qSlicerSegmentEditorScriptedEffect``, the C++ adaptor a scripted effect gets as
    ``scriptedEffect``: the properties and methods the effects use (``name``, ``title``, ``perSegment``,
    ``addOptionsWidget``, ``addLabeledOptionsWidget``, ``sourceVolumeImageData``, ``parameterSetNode``);
    anything else raises ``AttributeError``. ``options``: the widgets added, in order."""

    __slots__ = ("name", "title", "perSegment", "options", "_sourceImage", "_parameterSetNode")

    def __init__(self, sourceImage, parameterSetNode):
        self.name, self.title, self.perSegment = "", "", True
        self.options = []
        self._sourceImage, self._parameterSetNode = sourceImage, parameterSetNode

    def addOptionsWidget(self, widget):
        self.options.append(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self.options.append((label, widget))

    def sourceVolumeImageData(self):
        """The source volume aligned to the segmentation's geometry (here: given, a vtkOrientedImageData)."""
        return self._sourceImage

    def parameterSetNode(self):
        return self._parameterSetNode


def segmentEditorEffectsModule():
    """A ``SegmentEditorEffects`` module with a double of ``AbstractScriptedSegmentEditorAutoCompleteEffect``,
    modelled after Slicer's (Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/
    AbstractScriptedSegmentEditorAutoCompleteEffect.py, v5.8): ``__init__`` makes the effect work on the
    whole segmentation (``perSegment`` False); ``setupOptionsFrame`` adds the Auto-update check box and the
    Initialize, Cancel and Apply buttons (their ``clicked()`` connected to ``onPreview``, ``onCancel``,
    ``onApply``); ``preview`` merges the segments of the parameter set's segmentation node (real MRML,
    ``GenerateMergedLabelmapForAllSegments``, effective extent), calls ``computePreviewLabelmap(mergedImage,
    outputLabelmap)`` and keeps the output as :attr:`previewLabelmap` (Slicer: a preview segmentation node);
    ``getPreviewNode`` returns it (Slicer: the preview node), None before Initialize; ``onApply`` records it
    in :attr:`applied` (Slicer: ``modifySegmentByLabelmap`` per segment) and ``reset``s; ``onCancel``
    ``reset``s; ``cleanup`` does nothing. ``activate``/``deactivate`` are the effect's own (the C++ adaptor
    calls them when the effect is selected or left)."""
    module = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorAutoCompleteEffect:
        def __init__(self, scriptedEffect):
            scriptedEffect.perSegment = False
            self.scriptedEffect = scriptedEffect
            self.previewLabelmap = None
            self.applied = []

        def setupOptionsFrame(self):
            self.autoUpdateCheckBox = FakeCheckBox("autoUpdate")
            self.previewButton = FakePushButton(type(self).__name__ + "Preview")
            self.previewButton.text = "Initialize"
            self.cancelButton = FakePushButton(type(self).__name__ + "Cancel")
            self.applyButton = FakePushButton(type(self).__name__ + "Apply")
            self.previewButton.connect("clicked()", self.onPreview)
            self.cancelButton.connect("clicked()", self.onCancel)
            self.applyButton.connect("clicked()", self.onApply)
            self.scriptedEffect.addLabeledOptionsWidget("Preview:", self.previewButton)
            self.scriptedEffect.addOptionsWidget(self.cancelButton)
            self.scriptedEffect.addOptionsWidget(self.applyButton)

        def onPreview(self):
            self.preview()

        def preview(self):
            import slicer

            segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
            mergedImage = slicer.vtkOrientedImageData()
            segmentationNode.GenerateMergedLabelmapForAllSegments(
                mergedImage, slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)
            outputLabelmap = slicer.vtkOrientedImageData()
            self.computePreviewLabelmap(mergedImage, outputLabelmap)
            self.previewLabelmap = outputLabelmap
            self.previewButton.text = "Update"

        def getPreviewNode(self):
            """Slicer: the preview segmentation node, or None before Initialize (here: the preview labelmap)."""
            return self.previewLabelmap

        def reset(self):
            self.previewLabelmap = None
            self.previewButton.text = "Initialize"

        def onCancel(self):
            self.reset()

        def onApply(self):
            self.applied.append(self.previewLabelmap)
            self.reset()

        def cleanup(self):
            pass

    module.AbstractScriptedSegmentEditorAutoCompleteEffect = AbstractScriptedSegmentEditorAutoCompleteEffect
    return module
